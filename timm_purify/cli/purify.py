"""``timm-purify purify``: scan a model, remove its backdoor, write a Hub-ready folder, push it."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from .._auto import AUTO, AUTO_OPTIONS, auto_options, choose_method, untaken_error, unused_options, why
from ._common import open_model

__all__ = ["purify", "reproduce_command"]


def reproduce_command(params: dict) -> str:
    """The ``timm-purify purify`` line that redoes this run, from the parsed options.

    Built from the parsed values (not ``sys.argv``) so it is canonical: every option that
    changes the result is spelled out (the seed always), and what does not (device, quiet,
    the Hub push and above all the token) is left out.
    """
    parts = ["timm-purify", "purify", params["model"]]
    for flag, key in (
        ("--checkpoint", "checkpoint"),
        ("--num-classes", "num_classes"),
        ("--img-size", "img_size"),
        ("--data", "data"),
        ("--method", "method"),
        ("--out", "out_dir"),
        ("--clean-count", "clean_count"),
        ("--clean-fraction", "clean_fraction"),
        ("--eval-data", "eval_data"),
        ("--attack", "attack_file"),
    ):
        if params.get(key) is not None:
            parts += [flag, str(params[key])]
    for option in params.get("options") or ():
        parts += ["--option", option]
    parts += ["--seed", str(params["seed"])]
    if params.get("merge", "auto") != "auto":
        parts += ["--merge", params["merge"]]
    if params.get("scan") is False:
        parts.append("--no-scan")
    for option in params.get("scan_options") or ():
        parts += ["--scan-option", option]
    if params.get("license"):
        parts += ["--license", params["license"]]
    return shlex.join(parts)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:6.2f}%"


def _summary(result, report, out: Path, form: str, fold_reason: str) -> str:
    from ..metrics import der

    lines = [
        f"method {result.method}: {result.num_clean} clean images from {result.data}, "
        f"{result.seconds:.1f} s, seed {result.seed}"
    ]
    if report is not None:
        target = f", suspected target {report.target_name}" if report.suspected_target is not None else ""
        lines.append(f"scan of the input model: {report.verdict} (score {report.score:.4f}{target})")
    if result.before is not None and result.after is not None:
        b, a = result.before, result.after
        lines += [f"{'':8}{'before':>9}{'after':>9}", f"{'ACC':8}{_pct(b.acc):>9}{_pct(a.acc):>9}"]
        if b.asr is not None and a.asr is not None:
            lines += [
                f"{'ASR':8}{_pct(b.asr):>9}{_pct(a.asr):>9}   ({a.attack})",
                f"{'RA':8}{_pct(b.ra):>9}{_pct(a.ra):>9}",
                f"{'DER':8}{'':9}{_pct(der(b, a)):>9}",
            ]
    lines.append(f"saved to {out} as a {form} model ({fold_reason})")
    if form == "polarizer":
        lines.append(
            "load it with timm_purify.from_pretrained(...): plain timm.create_model would give the base "
            "model without the polarizer"
        )
    return "\n".join(lines)


def _check_options(method: str, options: dict, *, scan: bool, num_classes: int, num_clean: int) -> None:
    """Refuse bad method options before any work (the scan included), and what ``--method auto``
    cannot honour: it reads the target from the scan, each option must be taken by some method it
    may pick (those of :data:`AUTO_OPTIONS`) and suit every one that takes it. ``num_clean`` is the size of the clean set the method will get."""
    from ..defenses import PurifyOptionError
    from ..defenses._base import _build_config

    candidates = [(method, options)]
    if method == AUTO:
        if not scan:
            raise click.UsageError(
                "--method auto picks the method from the scan's finding; drop --no-scan, or name a method"
            )
        if "target" in options:
            raise click.BadParameter(
                "--method auto takes the target from the scan; to choose it yourself use "
                "--method npd-tp --option target=N",
                param_hint="--option",
            )
        refused = untaken_error(options)
        if refused:
            raise click.ClickException(f"--method auto: {refused}")
        # each candidate with the options it takes; npd-tp with a target the scan will supply
        candidates = [
            (name, {**auto_options(name, options), **({"target": 0} if name == "npd-tp" else {})})
            for name in AUTO_OPTIONS
        ]
    for name, opts in candidates:
        try:
            _build_config(name, opts).validate(num_clean=num_clean, num_classes=num_classes)
        except (PurifyOptionError, TypeError) as err:
            prefix = f"--method auto ({name}): " if method == AUTO else ""
            raise click.ClickException(f"{prefix}{err}") from err


def _parse_pairs(pairs: tuple[str, ...], what: str) -> dict:
    from .._train import parse_model_args

    try:
        return parse_model_args(pairs)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint=what) from err


@click.command()
@click.argument("model")
@click.option("--data", required=True, help="Clean images: bundled set name or image folder (train split).")
@click.option(
    "--method",
    default="npd",
    show_default=True,
    help="Purification method (npd, cnpd-*, nft, awm, ft...), or 'auto': npd-tp towards the scan's "
    "suspected target when it names one, awm for an all-to-all pattern on any model (its trigger "
    "search a window or a blend, as the scan's reading found it), cnpd-r for another backdoored "
    "LayerNorm model, else npd; with the options measured best on fully trained models (see "
    "README), unless given.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder to write (must not exist).",
)
@click.option("--clean-count", type=int, default=None, help="Use this many clean images (class-balanced).")
@click.option("--clean-fraction", type=float, default=None, help="Use this share of the clean images.")
@click.option("--eval-data", default=None, help="Test images for ACC/ASR before and after (default: --data).")
@click.option(
    "--attack",
    "attack_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="attack.json of the trigger to measure the ASR with.",
)
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Method option, e.g. epochs=20 (repeatable; JSON values).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--merge",
    type=click.Choice(["auto", "yes", "no"]),
    default="auto",
    show_default=True,
    help="Fold a polarizer into the model: auto = when exact; yes = required; no = keep it separate.",
)
@click.option(
    "--scan/--no-scan",
    default=True,
    show_default=True,
    help="Scan the input model (files and behaviour) first; the report goes into the model card.",
)
@click.option(
    "--scan-option", "scan_options", multiple=True, metavar="KEY=VALUE", help="Scan option, e.g. eps=0.1."
)
@click.option(
    "--push-to-hub", "repo_id", default=None, metavar="REPO_ID", help="Publish the folder as org/name."
)
@click.option("--private", is_flag=True, help="Create the Hub repository as private.")
@click.option("--token", default=None, help="Hub token (default: the logged-in one).")
@click.option("--license", default=None, help="License id for the model card (the base model's).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Weights for an architecture-name MODEL.")  # fmt: skip
@click.option("--num-classes", type=int, default=None, help="Head size for an architecture-name MODEL.")
@click.option("--img-size", type=int, default=None, help="Input size for an architecture-name MODEL.")
@click.option("--device", default=None, help="torch device (default: accelerate's choice).")
@click.option("--quiet", is_flag=True, help="No progress bars or step messages.")
def purify(**params) -> None:
    """Remove a backdoor from MODEL with --method and write a Hub-ready folder to --out.

    The folder holds safetensors weights, the model card (README.md) with before/after metrics
    and plots, and purify_result.json. A folded or mask-based result loads in vanilla timm; an
    unfoldable polarizer is stored beside the base model (load it with
    timm_purify.from_pretrained).
    """
    from .. import defenses
    from .._layers import NotAClassifierError, check_classifier
    from .._save import OutputExistsError, SaveError, _check_out_dir, _source_folders, save_pretrained
    from ..data import DataError, clean_subset, load_data

    p = params
    echo = (lambda msg: None) if p["quiet"] else (lambda msg: click.echo(msg, err=True))
    if p["clean_count"] is not None and p["clean_fraction"] is not None:
        raise click.UsageError("give --clean-count or --clean-fraction, not both")
    if (p["private"] or p["token"]) and not p["repo_id"]:
        raise click.UsageError("--private and --token only apply with --push-to-hub REPO_ID")
    if p["method"] != AUTO and p["method"] not in defenses.DEFENSES:
        raise click.BadParameter(
            f"unknown method {p['method']!r}; available: {', '.join(sorted(defenses.DEFENSES))}, {AUTO}",
            param_hint="--method",
        )
    options = _parse_pairs(p["options"], "--option")
    if "seed" in options:
        raise click.BadParameter("set the seed with --seed, not --option seed=...", param_hint="--option")
    scan_options = _parse_pairs(p["scan_options"], "--scan-option")
    out = Path(p["out_dir"]).expanduser()
    try:
        _check_out_dir(out, [])
    except OutputExistsError as err:
        raise click.ClickException(str(err)) from err

    echo(f"loading {p['model']}")
    net = open_model(
        p["model"], num_classes=p["num_classes"], img_size=p["img_size"], checkpoint=p["checkpoint"]
    )
    try:
        num_classes = check_classifier(net)
    except NotAClassifierError as err:
        raise click.ClickException(str(err)) from err
    sources = _source_folders(net, [p["model"]])
    try:
        _check_out_dir(out, sources)
    except OutputExistsError as err:
        raise click.ClickException(str(err)) from err
    # loaded (and subset) once: the scan and the method see the same images, and the options
    # are checked against the real clean-set size before either runs
    echo(f"loading the clean images from {p['data']}")
    try:
        clean = load_data(p["data"], split="train", model=net)
    except (DataError, FileNotFoundError) as err:
        raise click.ClickException(f"--data: {err}") from err
    if p["clean_count"] is not None or p["clean_fraction"] is not None:
        flag = "--clean-count" if p["clean_count"] is not None else "--clean-fraction"
        try:
            clean = clean_subset(clean, count=p["clean_count"], fraction=p["clean_fraction"], seed=p["seed"])
        except DataError as err:
            raise click.ClickException(f"{flag}: {err}") from err
    _check_options(p["method"], options, scan=p["scan"], num_classes=num_classes, num_clean=len(clean))

    report = None
    if p["scan"]:
        from ..detection.ban import ScanOptionError, scan

        echo("scanning the input model for a backdoor")
        files = p["checkpoint"] or (str(sources[0]) if sources else None)
        try:
            report = scan(
                net,
                clean,
                files=files,
                seed=p["seed"],
                device=p["device"],
                quiet=p["quiet"],
                **scan_options,
            )
        except (ScanOptionError, FileNotFoundError) as err:
            raise click.ClickException(f"scan: {err}") from err
        echo(f"scan: {report.verdict} (score {report.score:.4f})")

    method, chosen = choose_method(p["method"], report, options)
    added = {k: v for k, v in chosen.items() if k not in options}
    if method != p["method"]:
        unused = unused_options(method, options)
        if unused:
            # a warning, not a step message: shown under --quiet too
            click.echo(f"warning: {method} does not take --option {', '.join(unused)}: not used", err=True)
        # the saved command names what ran, so it reproduces without depending on a scan
        kept = tuple(o for o in p["options"] if o.partition("=")[0] not in unused)
        p = {**p, "method": method, "options": (*kept, *(f"{k}={v}" for k, v in added.items()))}
    options = chosen
    eval_data = p["eval_data"] or (p["data"] if p["attack_file"] else None)
    echo(f"purifying with {method}{why(added)}")
    try:
        result = defenses.purify(
            net,
            clean,
            method=method,
            eval_data=eval_data,
            eval_attack=p["attack_file"],
            device=p["device"],
            quiet=p["quiet"],
            seed=p["seed"],
            **options,
        )
    except (defenses.PurifyOptionError, DataError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err

    merge = {"auto": "auto", "yes": True, "no": False}[p["merge"]]
    try:
        saved = save_pretrained(
            result,
            out,
            merge=merge,
            scan_report=report,
            command=reproduce_command(p),
            repo_id=p["repo_id"],
            license=p["license"],
        )
    except SaveError as err:
        raise click.ClickException(str(err)) from err
    import json

    record = json.loads((saved / "purify_result.json").read_text())
    click.echo(_summary(result, report, saved, record["form"], record["fold"]["reason"]))

    if p["repo_id"]:
        from .._hub import HubPushError, push_to_hub

        echo(f"pushing {saved} to {p['repo_id']}")
        try:
            url = push_to_hub(saved, p["repo_id"], private=p["private"], token=p["token"])
        except HubPushError as err:
            raise click.ClickException(
                f"{err}\nThe folder is saved at {saved}; retry with `timm-purify push {saved} {p['repo_id']}`."
            ) from err
        click.echo(f"pushed: {url}")
