"""Load a timm classifier from any spec, safely; publish a finished model folder to the Hub.

A model spec is what a user types after ``timm-purify <command>``:

* ``hf-hub:org/name`` or ``org/name`` (optionally ``@revision``): a Hub repository written by
  timm (``config.json`` + weights), fetched with ``snapshot_download`` so the usual cache,
  ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` apply;
* ``local-dir:/path`` or a path to an existing folder: the same layout on disk;
* a timm architecture name (``resnet18``): random initialisation, or the weights of
  ``checkpoint=FILE`` (safetensors or a torch state dict).

Precedence for an unprefixed spec: an existing folder, then a timm architecture, then a Hub
id. Every weight file is inspected statically (:mod:`timm_purify.detection.static`) before
anything reads it, and pickles are only ever opened with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import difflib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

from torch import nn

from ._version import __version__
from ._wrap import POLARIZER_CONFIG, load_polarizer
from .detection.static import (
    PICKLE_EXTENSIONS,
    SCANNED_EXTENSIONS,
    Finding,
    UnsafeFileError,
    assert_safe,
    inspect_files,
    is_pickle_file,
)

__all__ = [
    "load_model",
    "push_to_hub",
    "resolve_source",
    "ModelLoadError",
    "ModelSpecError",
    "ModelNotFoundError",
    "NotATimmFolderError",
    "NumClassesMismatchError",
    "NoClassifierError",
    "CheckpointMismatchError",
    "HubPushError",
    "HUB_FILE_PATTERNS",
]

# What a timm Hub repository needs; everything else in the repo (images, logs, ONNX...) is skipped.
# Pickle weights are fetched only when the repo has no safetensors (see _download_hub).
# polarizer_config.json (with polarizer.safetensors) makes a purified folder whose polarizer
# could not be folded; load_model re-inserts the polarizer.
HUB_FILE_PATTERNS = [
    "config.json",
    "*.safetensors",
    "*.bin",
    "*.pth",
    "README.md",
    "polarizer_config.json",
    "purify_result.json",
]
_SAFE_PATTERNS = [p for p in HUB_FILE_PATTERNS if p not in ("*.bin", "*.pth")]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class ModelLoadError(Exception):
    """Base of the errors a user can cause when naming a model (the message says what to do)."""


class ModelSpecError(ModelLoadError, ValueError):
    """The spec names no folder, architecture or Hub id, or options contradict it."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The repository, revision, folder or checkpoint does not exist or cannot be reached."""


class NotATimmFolderError(ModelLoadError, FileNotFoundError):
    """A folder or repository without the ``config.json`` + weights layout timm writes."""


class NumClassesMismatchError(ModelLoadError, ValueError):
    """``num_classes`` contradicts the model's config or its checkpoint."""


class NoClassifierError(ModelLoadError, ValueError):
    """The model has no classification head (``num_classes == 0``)."""


class CheckpointMismatchError(ModelLoadError, ValueError):
    """The weights do not fit the architecture (missing, extra or mis-shaped tensors)."""


class HubPushError(ValueError):
    """A folder that must not be published, or a push the Hub refused."""


# ---------------------------------------------------------------------------------------
# spec resolution
# ---------------------------------------------------------------------------------------
def resolve_source(spec: str) -> tuple[str, str]:
    """Classify a model spec as ``("hub", "org/name[@rev]")``, ``("folder", path)`` or
    ``("architecture", name)`` without downloading or building anything."""
    import timm

    s = str(spec).strip()
    if not s:
        raise ModelSpecError(
            "Empty model spec: pass a Hub id (org/name), a folder or a timm architecture name."
        )
    if s.startswith("hf-hub:"):
        repo = s[len("hf-hub:") :]
        if not _HUB_ID.match(repo):
            raise ModelSpecError(f"{s!r} is not a Hub id: write hf-hub:org/name (optionally @revision).")
        return "hub", repo
    if s.startswith("local-dir:"):
        return "folder", str(Path(s[len("local-dir:") :]).expanduser())
    path = Path(s).expanduser()
    if path.is_dir():
        return "folder", str(path)
    if path.is_file():
        raise ModelSpecError(
            f"{s} is a file, not a model: name its architecture and pass the file as the checkpoint, "
            f"e.g. load_model('resnet18', checkpoint={s!r}) or `--checkpoint {s}` on the command line."
        )
    if timm.is_model(s):
        return "architecture", s
    if _HUB_ID.match(s):
        return "hub", s
    close = difflib.get_close_matches(s, timm.list_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ModelSpecError(
        f"{s!r} is not an existing folder, a timm architecture or a Hub id (org/name).{hint} "
        "See `timm.list_models()` for architecture names."
    )


def load_model(
    spec: str,
    *,
    num_classes: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    img_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    allow_pickle: bool = True,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    snapshot: str | os.PathLike | None = None,
) -> nn.Module:
    """Build the timm classifier ``spec`` names, in eval mode, after checking its files.

    A folder written by ``save_pretrained`` with an unfolded polarizer
    (``polarizer_config.json``) comes back as a ``PolarizedModel`` with the polarizer in place.

    The model remembers its origin in ``model._timm_purify_source`` (a Hub model by its bare
    id ``org/name[@rev]``, anything else as typed), which names the base model downstream.

    Args:
        spec: ``hf-hub:org/name``, ``org/name``, ``local-dir:/path``, a folder path, or a timm
            architecture name (see the module docstring).
        num_classes: head size. For folders and Hub repos it is read from ``config.json`` and
            only checked against this value; for an architecture it sizes the head (inferred
            from ``checkpoint`` when omitted).
        checkpoint: weights for an architecture name (safetensors, or a torch state dict).
        img_size: input size for an architecture name: passed as ``img_size`` to models that
            take it (ViT, Swin...) and recorded in ``pretrained_cfg`` (crop_pct 1.0) for all.
        model_kwargs: extra keyword arguments for ``timm.create_model``.
        allow_pickle: when False, refuse pickle-based weights even if the scan finds them safe.
        endpoint, cache_dir, token: for Hub ids, passed to ``huggingface_hub.snapshot_download``
            (default: ``HF_ENDPOINT``, the usual cache and the logged-in token).
        snapshot: for a Hub id, the snapshot folder the caller already downloaded (``scan``
            inspects the files before loading them): it is used instead of asking the Hub again,
            while the model is still named by its Hub id downstream.

    Raises:
        UnsafeFileError: a weight file holds unsafe imports or is damaged; nothing was loaded.
        ModelLoadError: subclasses for every other user mistake, each saying what to do.
    """
    kind, value = resolve_source(spec)
    if num_classes is not None and num_classes <= 0:
        raise NoClassifierError(
            f"num_classes={num_classes}: timm-purify acts on classifiers; pass the number of classes "
            "the model was trained on."
        )
    if checkpoint is not None and kind != "architecture":
        raise ModelSpecError(
            f"checkpoint= applies to an architecture name, but {spec!r} is a {kind} that already holds "
            "its weights: drop the checkpoint, or name the architecture instead."
        )
    if snapshot is not None and kind != "hub":
        raise ModelSpecError(
            f"snapshot= is the downloaded folder of a Hub id, but {spec!r} is a {kind}: drop snapshot=."
        )
    if kind == "architecture":
        model = _load_architecture(
            value,
            num_classes=num_classes,
            checkpoint=checkpoint,
            img_size=img_size,
            model_kwargs=model_kwargs,
            allow_pickle=allow_pickle,
        )
    else:
        if kind == "hub":
            folder = (
                Path(snapshot)
                if snapshot is not None
                else _download_hub(value, endpoint=endpoint, cache_dir=cache_dir, token=token)
            )
            what = f"Hub repository {value}"
        else:
            folder, what = Path(value), f"folder {value}"
            if not folder.is_dir():
                raise ModelNotFoundError(f"{value} is not an existing folder.")
        model = _load_folder(
            folder,
            what=what,
            num_classes=num_classes,
            img_size=img_size,
            model_kwargs=model_kwargs,
            allow_pickle=allow_pickle,
        )
        if kind == "hub":
            cfg = getattr(model, "pretrained_cfg", None)
            if isinstance(cfg, dict):  # look as if timm had loaded it from the Hub itself
                cfg.pop("file", None)
                cfg.update(hf_hub_id=value, source="hf-hub")
    if getattr(model, "num_classes", 0) <= 0:
        raise NoClassifierError(f"{spec} was built without a classifier head (num_classes=0).")
    # how the user would name it again; a Hub model by its bare id, valid as a card's base_model
    model._timm_purify_source = value if kind == "hub" else str(spec).strip()
    if kind != "architecture" and (folder / POLARIZER_CONFIG).is_file():
        return load_polarizer(model.eval(), folder).eval()
    return model.eval()


# ---------------------------------------------------------------------------------------
# Hub
# ---------------------------------------------------------------------------------------
def _download_hub(
    repo: str,
    *,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = repo.partition("@")

    def fetch(patterns: list[str]) -> Path:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision or None,
                allow_patterns=patterns,
                endpoint=endpoint,
                cache_dir=cache_dir,
                token=token,
                library_name="timm-purify",
                library_version=__version__,
            )
        )

    try:
        # safetensors first: a pickle is not even downloaded when safetensors weights exist
        folder = fetch(_SAFE_PATTERNS)
        if not any(folder.glob("*.safetensors")):
            folder = fetch(HUB_FILE_PATTERNS)
    except GatedRepoError as err:
        raise ModelNotFoundError(
            f"{repo_id} is a gated repository: accept its conditions on {constants.ENDPOINT}/{repo_id} "
            "and log in (`hf auth login`)."
        ) from err
    except RepositoryNotFoundError as err:
        raise ModelNotFoundError(
            f"Hub repository {repo_id!r} was not found on {constants.ENDPOINT} (and no folder has that name). "
            "Check the id (org/name); for a private repo log in with `hf auth login`; for another "
            "Hub set HF_ENDPOINT."
        ) from err
    except RevisionNotFoundError as err:
        raise ModelNotFoundError(
            f"Revision {revision!r} does not exist in {repo_id}: use a branch, tag or commit of that repo."
        ) from err
    except LocalEntryNotFoundError as err:
        if constants.is_offline_mode():
            reason = "HF_HUB_OFFLINE is set"
            todo = "run once with network access to cache it, or unset HF_HUB_OFFLINE"
        else:
            reason = f"the Hub ({constants.ENDPOINT}) could not be reached"
            todo = "check the network (and HF_ENDPOINT), then retry"
        raise ModelNotFoundError(
            f"{repo_id} is not (fully) in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}: "
            f"{todo}. ({err.__class__.__name__})"
        ) from err
    except HfHubHTTPError as err:
        raise ModelNotFoundError(f"The Hub refused to serve {repo_id}: {err}") from err
    if not (folder / "config.json").is_file():
        raise NotATimmFolderError(
            f"Hub repository {repo_id} has no config.json, so it is not a timm model. timm writes one with "
            "timm.models.push_to_hf_hub / save_for_hf; for a bare checkpoint, download it and pass "
            "the architecture name with checkpoint=FILE."
        )
    return folder


def push_to_hub(
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Publish a finished model folder as one commit; return the commit URL.

    The folder must hold README.md (the model card), config.json and safetensors weights,
    and no pickle-based file: publishing a pickle would hand every user a file that can run
    code. The repository is created if needed (``exist_ok``).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(out_dir).expanduser()
    if not folder.is_dir():
        raise HubPushError(f"{folder} is not a folder: pass the output folder of `timm-purify purify`.")
    if not _HUB_ID.match(repo_id) or "@" in repo_id:
        raise HubPushError(f"repo_id {repo_id!r} must look like 'org/name' (your user or organisation name).")
    missing = [n for n in ("README.md", "config.json") if not (folder / n).is_file()]
    if missing:
        raise HubPushError(
            f"{folder} lacks {' and '.join(missing)}: a published model needs its model card (README.md) "
            "and timm's config.json. Save the model with timm-purify (or timm.models.save_for_hf) first."
        )
    files = [p for p in folder.rglob("*") if p.is_file() and not _ignored_by_upload(p.relative_to(folder))]
    pickles = [
        p
        for p in files
        if p.name.lower().endswith(PICKLE_EXTENSIONS)
        or (p.name.lower().endswith(SCANNED_EXTENSIONS) and is_pickle_file(p))
    ]
    if pickles:
        names = ", ".join(str(p.relative_to(folder)) for p in pickles)
        raise HubPushError(
            f"{folder} holds pickle-based files ({names}); only safetensors are published. Remove them "
            "(timm-purify writes safetensors only)."
        )
    if not any(p.name.endswith(".safetensors") for p in files):
        raise HubPushError(f"{folder} holds no .safetensors weights: there is no model to publish.")
    damaged = [f for f in inspect_files(folder) if f.severity == "critical"]
    if damaged:
        raise HubPushError(
            "Refusing to publish damaged files:\n" + "\n".join(f"  - {f.message}" for f in damaged)
        )

    api = HfApi(endpoint=endpoint, token=token, library_name="timm-purify", library_version=__version__)
    try:
        repo_url = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=commit_message or f"Upload model with timm-purify {__version__}",
        )
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubPushError(
                f"The Hub refused to write to {repo_id} ({status}): log in with `hf auth login` or pass a "
                "token with write access."
            ) from err
        raise HubPushError(f"The Hub refused the push to {repo_id}: {err}") from err
    except ValueError as err:  # huggingface_hub's own checks, e.g. invalid README.md metadata
        raise HubPushError(f"The Hub rejected the folder: {err} Fix it, then push again.") from err
    except _connection_errors() as err:
        raise HubPushError(
            f"Could not reach the Hub to push {repo_id} ({err.__class__.__name__}: {err}). Check the network, "
            "HF_ENDPOINT, and that HF_HUB_OFFLINE is not set."
        ) from err
    return str(getattr(info, "commit_url", None) or repo_url)


def _ignored_by_upload(rel: Path) -> bool:
    """Files upload_folder skips anyway (git metadata, huggingface_hub's local cache)."""
    parts = rel.parts
    return ".git" in parts or parts[:2] == (".cache", "huggingface")


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Network failures of whichever HTTP stack the installed huggingface_hub uses."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


# ---------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------
def _weight_files(folder: Path) -> list[Path]:
    """Every file timm's local-dir loader could pick (it only looks at the top level)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and (p.name.lower().endswith(SCANNED_EXTENSIONS) or p.name.lower().endswith(".pth.tar"))
    )


def _picked_by_timm(folder: Path) -> Path | None:
    """The weight file timm's local-dir loader will read: its preferred names, then extensions."""
    try:
        from timm.models._hub import _EXT_PRIORITY, _PREFERRED_FILES
    except ImportError:  # another timm layout: only the name every version prefers is certain
        _PREFERRED_FILES, _EXT_PRIORITY = ("model.safetensors",), ()
    for name in _PREFERRED_FILES:
        if (folder / name).is_file():
            return folder / name
    for ext in _EXT_PRIORITY:
        found = sorted(folder.glob(f"*{ext}"))
        if found:
            return found[0]
    return None


def _load_folder(
    folder: Path,
    *,
    what: str,
    num_classes: int | None,
    img_size: int | None,
    model_kwargs: dict[str, Any] | None,
    allow_pickle: bool,
) -> nn.Module:
    import timm

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise NotATimmFolderError(
            f"{what} has no config.json, so it is not a timm model folder. Write one with "
            "timm.models.save_for_hf(model, folder, safe_serialization=True), or pass the "
            "architecture name with checkpoint=FILE."
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NotATimmFolderError(f"config.json of {what} is not valid JSON ({err}).") from err
    if not isinstance(config, dict):
        raise NotATimmFolderError(f"config.json of {what} is not a JSON object, so not a timm config.")
    pretrained_cfg = (
        config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else config
    )
    arch = config.get("architecture") or pretrained_cfg.get("architecture")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise ModelSpecError(
            f"config.json of {what} names architecture {arch!r}, which timm {timm.__version__} does not know: "
            "upgrade timm (`pip install -U timm`) or fix config.json."
        )
    cfg_classes = config.get("num_classes", pretrained_cfg.get("num_classes"))
    if cfg_classes == 0:
        raise NoClassifierError(
            f"{what} is a feature extractor (num_classes=0 in config.json); timm-purify needs a classifier."
        )
    if num_classes is not None and isinstance(cfg_classes, int) and num_classes != cfg_classes:
        raise NumClassesMismatchError(
            f"{what} is a {cfg_classes}-class model (config.json) but num_classes={num_classes} was asked. "
            "Drop num_classes: it is read from config.json."
        )
    if img_size is not None:
        size = pretrained_cfg.get("input_size")
        if isinstance(size, list | tuple) and len(size) == 3 and tuple(size[1:]) != (img_size, img_size):
            raise ModelSpecError(
                f"{what} expects {size[1]}x{size[2]} inputs (config.json); img_size applies to bare "
                "architecture names only. Drop img_size."
            )

    weights = _weight_files(folder)
    if not weights:
        raise NotATimmFolderError(
            f"{what} has config.json but no weights (model.safetensors or pytorch_model.bin). "
            "Save them with timm.models.save_for_hf(model, folder, safe_serialization=True)."
        )
    findings: list[Finding] = []
    for w in weights:
        findings.extend(inspect_files(w))
    assert_safe(findings)
    picked = _picked_by_timm(folder)
    if not allow_pickle and (picked is None or not picked.name.endswith(".safetensors")):
        raise ModelSpecError(
            f"timm would load {picked.name if picked else 'pickle-based weights'} from {what}, and "
            "allow_pickle=False. Convert the weights to model.safetensors, or allow pickles (they are "
            "opened with torch.load(weights_only=True) after the scan)."
        )
    return _create(
        f"local-dir:{folder}",
        what=what,
        files=weights,
        pretrained=True,
        **dict(model_kwargs or {}),
    )


def _create(name: str, *, what: str, files: list[Path], **kwargs: Any) -> nn.Module:
    """timm.create_model with its load failures turned into errors a user can act on."""
    import timm

    try:
        return timm.create_model(name, **kwargs)
    except (pickle.UnpicklingError, RuntimeError) as err:
        if _refused_by_weights_only(err):
            raise _weights_only_refusal(", ".join(str(f) for f in files), err) from err
        if "state_dict" not in str(err):
            raise
        raise CheckpointMismatchError(
            f"The weights of {what} do not fit the architecture: {_short(err)}"
        ) from err


def _refused_by_weights_only(err: BaseException) -> bool:
    """torch.load(weights_only=True) raises UnpicklingError; timm re-raises it as RuntimeError."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, pickle.UnpicklingError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _weights_only_refusal(file: str, err: BaseException) -> UnsafeFileError:
    return UnsafeFileError(
        [
            Finding(
                "critical",
                file,
                "unsafe-import",
                f"torch.load(weights_only=True) refused it ({_short(err, 300)}): it holds objects other than "
                "tensors (a pickled model?). Save model.state_dict() as safetensors instead.",
            )
        ]
    )


def _short(err: BaseException, limit: int = 600) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."


# ---------------------------------------------------------------------------------------
# bare architectures
# ---------------------------------------------------------------------------------------
def _load_architecture(
    arch: str,
    *,
    num_classes: int | None,
    checkpoint: str | os.PathLike | None,
    img_size: int | None,
    model_kwargs: dict[str, Any] | None,
    allow_pickle: bool,
) -> nn.Module:
    import timm

    kwargs = dict(model_kwargs or {})
    state_dict = None
    ckpt = None
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser()
        if not ckpt.is_file():
            raise ModelNotFoundError(f"Checkpoint {ckpt} does not exist.")
        assert_safe(inspect_files(ckpt))
        pickled = is_pickle_file(ckpt)
        if pickled and not allow_pickle:
            raise ModelSpecError(
                f"{ckpt} is pickle-based and allow_pickle=False: convert it to safetensors or allow pickles."
            )
        state_dict = _read_checkpoint(ckpt, pickled=pickled)
        head = _head_size(arch, state_dict)
        if num_classes is None:
            num_classes = head
        elif head is not None and head != num_classes:
            raise NumClassesMismatchError(
                f"{ckpt} holds a {head}-class head but num_classes={num_classes} was asked: drop num_classes "
                "(it is read from the checkpoint) or pass the matching checkpoint."
            )
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        in_chans = int(kwargs.get("in_chans", 3))
        overlay = {"input_size": (in_chans, img_size, img_size), "crop_pct": 1.0}
        overlay.update(kwargs.pop("pretrained_cfg_overlay", None) or {})
        kwargs["pretrained_cfg_overlay"] = overlay
    try:
        if img_size is None:
            model = timm.create_model(arch, pretrained=False, **kwargs)
        else:
            try:
                model = timm.create_model(arch, pretrained=False, img_size=img_size, **kwargs)
            except TypeError as err:
                if "img_size" not in str(err):
                    raise
                model = timm.create_model(arch, pretrained=False, **kwargs)  # fully convolutional
    except (AssertionError, RuntimeError, ValueError) as err:
        raise ModelSpecError(
            f"timm cannot build {arch} with {kwargs or 'the defaults'}: {_short(err)}"
        ) from err
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            hint = " If it was trained at another input size, pass img_size." if img_size is None else ""
            raise CheckpointMismatchError(f"{ckpt} does not fit {arch}: {_short(err)}{hint}") from err
    return model


def _read_checkpoint(path: Path, *, pickled: bool) -> dict[str, Any]:
    """Read a state dict (already scanned): safetensors directly, pickles with weights_only."""
    if not pickled:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    from timm.models import load_state_dict

    try:
        # unwraps training checkpoints ({"state_dict": ...}, EMA first) and DataParallel prefixes
        return load_state_dict(str(path), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        if _refused_by_weights_only(err):
            raise _weights_only_refusal(str(path), err) from err
        raise


def _head_size(arch: str, state_dict: dict[str, Any]) -> int | None:
    """Number of classes of the checkpoint's head, found through timm's classifier name."""
    from timm.models import get_pretrained_cfg_value

    try:
        classifier = get_pretrained_cfg_value(arch, "classifier")
    except Exception:  # an architecture without a registered pretrained config
        return None
    if isinstance(classifier, list | tuple):
        classifier = classifier[0] if classifier else None
    weight = state_dict.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    shape = getattr(weight, "shape", None)
    return int(shape[0]) if shape else None
