"""heretic: remove refusal behaviour from open-weight chat models, keeping the rest intact."""
