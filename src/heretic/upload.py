"""Upload a saved output folder to the Hugging Face hub.

Uploading is the last step and the one most likely to fail for reasons outside heretic (no
token, a token without write access, a repository owned by someone else, no network), so it
runs only after the local output is complete, never touches it, and turns every failure into an
`ExportError` that says what to fix and that the local files are still there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from heretic.errors import ExportError


@dataclass(frozen=True)
class UploadResult:
    repo_id: str
    url: str
    private: bool


def resolve_token(token: str | None = None) -> str:
    """The token to use: explicit, else HF_TOKEN / the cached `hf auth login` token."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise ExportError(
            "No Hugging Face token found: run `hf auth login` (or set HF_TOKEN) with a token "
            "that has write access, then upload again."
        )
    return found


def upload_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str = "Upload model abliterated with heretic",
) -> UploadResult:
    """Create `repo_id` if needed (private when asked) and upload `folder` to it in one commit.

    `endpoint` overrides the hub URL (HF_ENDPOINT is honoured too); tests point it at a closed
    port or a stub server to exercise the failure paths without the real hub.
    """
    if repo_id.count("/") != 1 or not all(part.strip() for part in repo_id.split("/")):
        raise ExportError(
            f"Repository id {repo_id!r} must look like 'user/name' or 'organization/name'."
        )
    if not folder.is_dir() or not any(folder.iterdir()):
        raise ExportError(f"Nothing to upload: {folder} does not exist or is empty; save first.")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    token = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    kept = f"The local output in {folder} is kept."
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=commit_message,
        )
    except OfflineModeIsEnabled as e:
        raise ExportError(
            f"Cannot upload to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1). Unset it and "
            f"upload again. {kept}"
        ) from e
    except HfHubHTTPError as e:
        raise ExportError(f"Upload to {repo_id} failed: {_http_failure(e)}. {kept}") from e
    except Exception as e:  # transport errors: DNS, refused connection, timeout, TLS
        raise ExportError(
            f"Upload to {repo_id} failed: cannot reach the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no details'}). Check the network (or "
            f"HF_ENDPOINT) and upload again. {kept}"
        ) from e
    url = str(getattr(repo_url, "url", repo_url))
    return UploadResult(repo_id=repo_id, url=url, private=private)


def _http_failure(error: Exception) -> str:
    """What an HTTP error from the hub means for this upload, by its status code, and what to
    change before uploading again."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return "the token is invalid or expired: run `hf auth login` again"
    if status == 403:
        return (
            "the token may not write there: use a token with write access, or a repo id "
            "under your own user or an organization you belong to"
        )
    if status == 404:
        return "the repository or its namespace does not exist (check the user/organization)"
    return f"the hub answered {status}: {str(error).splitlines()[0]}"
