"""Profiles for the tiny FLUX model, shared by the profile, source, Hub and CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import safe_open, save_file

from hyca.math.solvers import pool_names
from hyca.adapters.diffusers.fingerprint import fingerprint
from hyca.profiles.fingerprint import total_blocks
from hyca.profiles.io import tensor_digest
from hyca.profiles.profile import Profile

from tiny import tiny_flux

_FP: dict | None = None


def tiny_fingerprint() -> dict:
    """Fingerprint of tests/tiny.py's tiny_flux() (computed once: building the model is slow-ish)."""
    global _FP
    if _FP is None:
        _FP = fingerprint(tiny_flux())
    return dict(_FP)


def random_profile(fp: dict, clusters: int = 4, seed: int = 0, **metadata) -> Profile:
    """Labels and solvers drawn at random, shaped for the model ``fp`` names."""
    g = torch.Generator().manual_seed(seed)
    blocks, dim = total_blocks(fp), fp["hidden_size"]
    return Profile(
        labels=torch.randint(0, clusters, (blocks, dim), generator=g),
        solvers=torch.randint(0, len(pool_names()), (blocks, clusters), generator=g),
        metadata={"fingerprint": fp, **metadata},
    )


def read_parts(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the decoded HyCa header of a profile file."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["hyca"])


def write_parts(path: Path, tensors: dict[str, torch.Tensor], header: dict | str, checksum: bool = True) -> Path:
    """A safetensors file with the given tensors and HyCa header (to forge bad profiles);
    ``checksum``: give the header the right checksum for the forged tensors."""
    if checksum and isinstance(header, dict) and {"labels", "solvers"} <= set(tensors):
        header = {**header, "tensors_sha256": tensor_digest(tensors)}
    text = header if isinstance(header, str) else json.dumps(header)
    save_file(tensors, str(path), metadata={"hyca": text})
    return path


def permuted(profile: Profile, seed: int) -> Profile:
    """Same partition and solvers, cluster ids renumbered differently in every block."""
    g = torch.Generator().manual_seed(seed)
    labels, solvers = torch.empty_like(profile.labels), torch.empty_like(profile.solvers)
    for blk in range(profile.num_blocks):
        perm = torch.randperm(profile.num_clusters, generator=g)  # old id -> new id
        labels[blk] = perm[profile.labels[blk]]
        solvers[blk, perm] = profile.solvers[blk]
    return Profile(labels, solvers, dict(profile.metadata))


def no_profiles_but_a_cache(tmp_path, monkeypatch, cache: str = "cache") -> None:
    """Profile lookup sees an empty cache under ``tmp_path`` and nothing else (no Hub, no
    extra folder)."""
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path / cache))
    monkeypatch.setenv("HYCA_HUB_REPO", "none")
    monkeypatch.setenv("HYCA_PROFILES", str(tmp_path / "nothing-here"))


def stand_in_probes(monkeypatch, make) -> list[dict]:
    """Replace the diffusers probe by ``make(pipe, options) -> Profile``; returns the list
    of the options each probe was asked with (filled as probes run)."""
    calls: list[dict] = []

    def stand_in(pipe, **options):
        calls.append(options)
        return make(pipe, options)

    monkeypatch.setattr("hyca.adapters.diffusers.probe.probe", stand_in)
    return calls
