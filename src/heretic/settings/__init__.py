"""The fields of `heretic.config.Settings`, grouped by topic: one pydantic mixin class per group
of settings that sit together in `heretic --help` and config.default.toml.

Each group keeps the checks that concern only its own fields; checks across groups, the
settings sources and `load_settings` stay in `heretic.config`, which is what the rest of heretic
imports. A group is a run of consecutive fields, so that the field order (and with it the help
text and config.default.toml) is the order in which `Settings` lists its bases, reversed.
"""
