"""Fréchet Inception Distance (Heusel et al. 2017) with pytorch-fid's Inception network.

FID = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) over the 2048-d pool3 features of the
TensorFlow Inception graph of 2015-12-05 (feature alignment paper, Eq. 10). Rule-agnostic: it sees
only image tensors in [0, 1] of shape (N, C, H, W) with C = 1 or 3 (grey images are repeated to
three channels; pytorch-fid's network resizes to 299x299 bilinearly and rescales to [-1, 1]).

Weights are never random. They come from, in order: an explicit path (`--fid-weights PATH`), the
environment variable FA_RULES_FID_WEIGHTS, or torch hub's cache
(`$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth`, where pytorch-fid keeps its
download). When none exists, pytorch-fid's download is tried unless FA_RULES_OFFLINE is set; every
failure is a one-line `UserError` saying where to put the file.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from fa_rules.core.checkpoint import atomic_write_with, remove_stale_tmp_files
from fa_rules.core.errors import UserError

FID_WEIGHTS_ENV = "FA_RULES_FID_WEIGHTS"
FID_CACHE_ENV = "FA_RULES_FID_CACHE"  # where real-image features are kept ("off": nowhere)
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048

_lock = threading.Lock()
_models: dict[tuple[str, str], torch.nn.Module] = {}


def hub_weights_path() -> Path:
    """Where pytorch-fid looks for (and downloads) its weights: torch hub's checkpoint cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _offline() -> bool:
    return os.environ.get("FA_RULES_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _missing(where: str) -> UserError:
    return UserError(
        f"FID Inception weights not found ({where}); pass --fid-weights PATH, set {FID_WEIGHTS_ENV}, "
        f"or put {WEIGHTS_FILE} in {hub_weights_path().parent}"
    )


def resolve_weights(path: str | os.PathLike | None = None, download: bool | None = None) -> Path:
    """The weights file to use: `path`, else $FA_RULES_FID_WEIGHTS, else torch hub's cache."""
    if path is not None and str(path) != "":
        p = Path(path).expanduser()
        if not p.is_file():
            raise _missing(f"no file {p}")
        return p
    env = os.environ.get(FID_WEIGHTS_ENV, "").strip()
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise _missing(f"{FID_WEIGHTS_ENV}={env} is not a file")
        return p
    p = hub_weights_path()
    if p.is_file():
        return p
    if download is None:
        download = not _offline()
    if not download:
        raise _missing(f"nothing at {p}")
    try:
        from pytorch_fid.inception import FID_WEIGHTS_URL

        p.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(p), progress=False)
    except Exception as e:  # offline, proxy, disk: all end the same way for the user
        raise _missing(f"nothing at {p}; download failed: {type(e).__name__}") from None
    return p


def load_inception(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """pytorch-fid's `InceptionV3` (pool3 block) with weights from `resolve_weights(weights)`.

    pytorch-fid fetches its state dict by URL inside the constructor; we hand it the resolved file
    instead, so the network is exactly pytorch-fid's and nothing is downloaded behind our back.
    """
    path = resolve_weights(weights)
    device = torch.device(device)
    key = (str(path.resolve()), str(device))
    with _lock:
        if key in _models:
            return _models[key]
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except OSError as e:
            raise UserError(f"cannot read FID Inception weights {path}: {e.strerror or e}") from None
        except Exception as e:  # (torch's own message advises weights_only=False: never for a file we did not make)
            raise UserError(f"cannot read FID Inception weights {path}: not a torch state dict file "
                            f"({type(e).__name__})") from None
        import pytorch_fid.inception as inception

        original = inception.load_state_dict_from_url
        inception.load_state_dict_from_url = lambda *args, **kwargs: state
        try:
            model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]])
        except RuntimeError as e:  # wrong or truncated state dict
            raise UserError(f"{path} is not a pytorch-fid Inception state dict ({str(e).splitlines()[0]})") from None
        finally:
            inception.load_state_dict_from_url = original
        model = model.eval().to(device)
        _models[key] = model
        return model


def _as_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"FID needs images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    images = images.float()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.clamp(0.0, 1.0)


@torch.no_grad()
def inception_features(
    images: torch.Tensor | Iterable[torch.Tensor], model: torch.nn.Module, batch_size: int = 50
) -> np.ndarray:
    """Pool3 features (N, 2048), float64, of images in [0, 1]: one tensor or an iterable of batches."""
    model.eval()
    device = next(model.parameters()).device
    chunks = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    feats = []
    for chunk in chunks:
        for part in _as_rgb(chunk).split(batch_size):
            out = model(part.to(device))[0]
            feats.append(out.reshape(out.shape[0], -1).double().cpu())
    if not feats:
        raise ValueError("FID needs at least two images per set")
    return torch.cat(feats).numpy()


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a feature set."""
    if features.shape[0] < 2:
        raise ValueError("FID needs at least two images per set")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets (N_a, D) and (N_b, D), float64.

    tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b, which are
    those of the symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2). With fewer images than feature
    dimensions it is cheaper still: for centred features A, B, the non-zero eigenvalues of
    S_a S_b are the squared singular values of A B^T / sqrt((N_a - 1)(N_b - 1)), so the trace is
    that matrix's nuclear norm. Both are exact and avoid a general (Schur) matrix square root,
    which takes minutes for D = 2048 on a small CPU.
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("FID needs at least two images per set")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    ca, cb = a - mu_a, b - mu_b
    na, nb, d = a.shape[0], b.shape[0], a.shape[1]
    trace_a = float((ca * ca).sum()) / (na - 1)
    trace_b = float((cb * cb).sum()) / (nb - 1)
    if min(na, nb) <= d:
        cross = ca @ cb.T / np.sqrt((na - 1) * (nb - 1))
        trace_sqrt = float(np.linalg.svd(cross, compute_uv=False).sum())
    else:
        sigma_a = ca.T @ ca / (na - 1)
        sigma_b = cb.T @ cb / (nb - 1)
        w, v = np.linalg.eigh(sigma_a)
        root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        inner = np.linalg.eigvalsh(root_a @ sigma_b @ root_a)
        trace_sqrt = float(np.sqrt(np.clip(inner, 0.0, None)).sum())
    diff = mu_a - mu_b
    return float(diff @ diff + trace_a + trace_b - 2.0 * trace_sqrt)


def fid(
    generated: torch.Tensor | Iterable[torch.Tensor],
    real: torch.Tensor | Iterable[torch.Tensor],
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 50,
) -> float:
    """FID between two image sets in [0, 1] (tensors or iterables of batches)."""
    model = load_inception(weights, device)
    return frechet_distance(inception_features(generated, model, batch_size), inception_features(real, model, batch_size))


# -- a rule's samples against a dataset's test images ---------------------------------------------
def rule_samples(rule, network, params, state, num: int, seed: int = 0, batch_size: int = 100, labels=None):
    """`num` samples of a generative rule, drawn in batches from one generator seeded with `seed`
    (`labels`: None or one class per sample).

    Yields (images in [0, 1] on the CPU, seconds spent drawing them); a first small draw warms up
    torch.func and is neither timed nor returned."""
    import time

    if rule.sample is None:
        raise UserError("this rule does not draw samples")
    device = next(iter(params["model"].values())).device
    with torch.enable_grad():  # warm-up (first-call costs of torch.func), not timed nor returned
        rule.sample(network, params, state, 2, torch.Generator(device=device).manual_seed(seed + 1),
                    labels=None if labels is None else labels[:2])
    generator = torch.Generator(device=device).manual_seed(seed)
    done = 0
    while done < num:
        n = min(batch_size, num - done)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.enable_grad():  # a sample may run a gradient flow
            images = rule.sample(network, params, state, n, generator,
                                 labels=None if labels is None else labels[done : done + n])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        yield images.detach().float().cpu(), time.perf_counter() - start
        done += n


def rule_fid(
    rule, network, params, state, real: torch.Tensor, num: int,
    weights: str | os.PathLike | None = None, seed: int = 0, batch_size: int = 100,
    device: str | torch.device | None = None,
) -> dict:
    """FID of `num` samples of a rule against the first `num` images of `real` (N, C, H, W).

    Returns `{"fid", "fid_num", "time_per_sample_s"}` (sampling time only, batches of `batch_size`)."""
    if num < 2:
        raise UserError("FID needs --num >= 2")
    if num > real.shape[0]:
        raise UserError(f"FID of {num} samples needs {num} test images; the test split has {real.shape[0]}")
    if device is None:
        device = next(iter(params["model"].values())).device
    model = load_inception(weights, device)  # fails (one line) before any sampling when weights are missing
    seconds = 0.0

    def generated():
        nonlocal seconds
        for images, dt in rule_samples(rule, network, params, state, num, seed, batch_size):
            seconds += dt
            yield images

    fake = inception_features(generated(), model)
    value = frechet_distance(fake, real_features(real[:num], model, resolve_weights(weights), batch_size))
    return {"fid": value, "fid_num": num, "time_per_sample_s": seconds / num}


# -- the real images' features, computed once --------------------------------------------------
def feature_cache_dir() -> Path | None:
    env = os.environ.get(FID_CACHE_ENV, "").strip()
    if env.lower() == "off":
        return None
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fa-rules" / "fid"


def real_features(real: torch.Tensor, model: torch.nn.Module, weights: Path, batch_size: int = 100) -> np.ndarray:
    """Inception features of a dataset's images (N, C, H, W), cached on disk: every FID against the
    same test images (each rule, each run) would otherwise repeat the slowest part of the work.
    The key is a hash of the images' bytes and of the weights file, so a change in either misses."""
    from fa_rules.core.data import as_float

    def compute() -> np.ndarray:
        return inception_features((as_float(real[i : i + batch_size]) for i in range(0, real.shape[0], batch_size)), model)

    folder = feature_cache_dir()
    if folder is None:
        return compute()
    digest = hashlib.sha256(real.detach().cpu().contiguous().numpy().tobytes())
    digest.update(f"{tuple(real.shape)} {real.dtype} {weights.resolve()} {weights.stat().st_size}".encode())
    path = folder / f"real-{digest.hexdigest()[:32]}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):  # a damaged file is recomputed and replaced
            pass
    features = compute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp_files(folder)  # of processes killed while writing here
        atomic_write_with(path, lambda f: np.save(f, features))  # a reader sees the whole file or none
    except OSError:  # a read-only home is no reason to fail the FID
        pass
    return features
