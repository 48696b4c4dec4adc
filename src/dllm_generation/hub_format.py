"""Writing checkpoints in the Fast_dLLM hub format (what `Efficient-Large-Model/Fast_dLLM_v2_7B` serves).

A Fast_dLLM checkpoint is a Qwen2 checkpoint whose config.json says `model_type: Fast_dLLM_Qwen`,
names the remote code in `auto_map` and carries the block size `bd_size`. Saving in that format
means a trained model goes through exactly the loading path a user's download does.
"""

from __future__ import annotations

import hashlib
import json
import os

CHECKSUM_FILE = "SHA256SUMS"

# Keys of the hub config.json that transformers' Qwen2Config does not write.
HUB_IDENTITY = {
    "architectures": ["Fast_dLLM_QwenForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration.Fast_dLLM_QwenConfig",
        "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM",
    },
    "model_type": "Fast_dLLM_Qwen",
}


def hub_config_dict(config, *, bd_size: int, dtype: str) -> dict:
    """config.json content for a Qwen2 `config` in the hub format."""
    raw = config.to_dict()
    for key in ("transformers_version", "dtype", "torch_dtype", "_name_or_path"):
        raw.pop(key, None)
    raw.update(HUB_IDENTITY, bd_size=int(bd_size), torch_dtype=dtype)
    return raw


def save_hub_checkpoint(model, path: str, *, bd_size: int, tokenizer=None, dtype=None,
                        max_shard_size: str | None = None) -> str:
    """Save `model` (a Qwen2 causal LM) and `tokenizer` to `path` in the hub format, with checksums."""
    import torch

    os.makedirs(path, exist_ok=True)
    dtype = dtype or model.dtype
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(path, safe_serialization=True, **kwargs)
    dtype_name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else str(dtype)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hub_config_dict(model.config, bd_size=bd_size, dtype=dtype_name), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    write_checksums(path)
    return path


def write_checksums(path: str) -> None:
    """SHA256SUMS over every file of the folder (sha256sum's format), written atomically."""
    names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)) and n != CHECKSUM_FILE)
    lines = [f"{file_sha256(os.path.join(path, n))}  {n}\n" for n in names]
    tmp = os.path.join(path, CHECKSUM_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, os.path.join(path, CHECKSUM_FILE))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ChecksumError(OSError):
    """A shipped file is missing, truncated or altered; the message names the file."""


def verify_checksums(path: str, *, label: str = "shipped model file", advice: str | None = "reinstall the package") -> None:
    """Raise ChecksumError naming the first file of SHA256SUMS that is missing or differs.

    `label` says what the files are in the message, and `advice` what to do about it.
    """
    sums = os.path.join(path, CHECKSUM_FILE)
    then = f"; {advice}" if advice else ""
    try:
        with open(sums, encoding="utf-8") as f:
            entries = [line.rstrip("\n").split("  ", 1) for line in f if line.strip()]
    except FileNotFoundError:
        raise ChecksumError(f"the checksum file {sums} is missing, so the {label}s cannot be checked{then}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ChecksumError(f"the checksum file {sums} cannot be read ({err}){then}") from None
    if not entries:
        raise ChecksumError(f"the checksum file {sums} lists no files{then}")
    for entry in entries:
        if len(entry) != 2 or not _is_sha256(entry[0]) or not entry[1] or os.path.isabs(entry[1]) or ".." in entry[1].split("/"):
            raise ChecksumError(f"the checksum file {sums} has a malformed line: {'  '.join(entry)!r} "
                                f"(allowed: '<64 hex digits>  <file name>', as sha256sum writes){then}")
        expected, name = entry
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ChecksumError(f"{label} {file} is missing{then}")
        actual = file_sha256(file)
        if actual != expected:
            raise ChecksumError(f"checksum mismatch for {label} {file} (expected sha256 {expected}, got {actual})"
                                + (f": the file is corrupt or truncated{then}" if advice else ""))


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text.lower())
