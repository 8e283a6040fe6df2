"""Build the model card (``README.md``) of a purified model.

The card is ``"---\\n" + ModelCardData.to_yaml() + "\\n---\\n" + body``: huggingface_hub's
``ModelCard.from_template`` needs Jinja2, which is not a dependency. The YAML header carries
what the Hub indexes (``library_name: timm``, ``base_model``, tags and a ``model-index`` with
clean accuracy, ASR, RA and DER per evaluated attack plus the scan verdict); the body says
what was scanned and found, what purification did, how to load the model, how to reproduce
it, and the limits of the claims.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import EvalResult as HubEvalResult
from huggingface_hub import ModelCard, ModelCardData

from .._version import __version__
from ..detection.report import SPREAD_NAMES, all_to_one_found, spread_readings, stage_label
from ..metrics import EvalResult, der
from .plots import PLOT_CAPTIONS

__all__ = ["SAVE_FORMS", "TAGS", "build_model_card", "merge_evaluations", "hub_model_id"]

SAVE_FORMS = ("plain", "folded", "polarizer")
TAGS = ["timm", "image-classification", "timm-purify", "backdoor-defense"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TASK = "image-classification"


def hub_model_id(reference: str | None) -> str | None:
    """``org/name`` when ``reference`` names a Hub repository (``hf-hub:`` and ``@rev`` dropped),
    else None: the card's ``base_model`` must be a Hub id, not a local path or architecture."""
    if not reference:
        return None
    ref = reference.strip()
    ref = ref[len("hf-hub:") :] if ref.startswith("hf-hub:") else ref
    ref = ref.split("@", 1)[0]
    return ref if _HUB_ID.match(ref) and not ref.startswith((".", "/")) else None


def merge_evaluations(
    result=None, evaluations: Mapping[str, tuple[EvalResult, EvalResult]] | None = None
) -> dict[str, tuple[EvalResult, EvalResult]]:
    """Every ``(before, after)`` pair to report, keyed by attack name (``"clean"`` when the
    evaluation had no attack): the caller's ``evaluations`` plus the result's own."""
    merged: dict[str, tuple[EvalResult, EvalResult]] = {}
    if result is not None and result.before is not None and result.after is not None:
        merged[result.after.attack or result.before.attack or "clean"] = (result.before, result.after)
    for name, pair in (evaluations or {}).items():
        before, after = pair
        if not isinstance(before, EvalResult) or not isinstance(after, EvalResult):
            raise TypeError(
                f"evaluations[{name!r}] must be a (before, after) pair of timm_purify EvalResults"
            )
        merged[str(name)] = (before, after)
    return merged


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.2f}%"


def _round(value: float) -> float:
    return round(100.0 * float(value), 2)


def _scan_dict(scan_report) -> dict | None:
    if scan_report is None:
        return None
    if hasattr(scan_report, "to_dict"):
        return scan_report.to_dict()
    return dict(scan_report)


def _eval_results(
    evaluations: dict[str, tuple[EvalResult, EvalResult]], scan: dict | None, scan_data: str
) -> list[HubEvalResult]:
    """model-index entries: metrics of *this* (purified) model, one group per test set and
    attack; the scan verdict describes the base model and says so."""
    out: list[HubEvalResult] = []
    seen_data: set[str] = set()
    for name, (before, after) in evaluations.items():
        data = after.data or before.data or "test set"
        if data not in seen_data:
            seen_data.add(data)
            out.append(
                HubEvalResult(
                    task_type=_TASK,
                    dataset_type=data,
                    dataset_name=data,
                    dataset_split="test",
                    metric_type="accuracy",
                    metric_value=_round(after.acc),
                    metric_name="Clean accuracy (%)",
                )
            )
        if after.asr is None or before.asr is None:
            continue
        common = dict(
            task_type=_TASK,
            dataset_type=data,
            dataset_name=f"{data} with the {name} trigger",
            dataset_config=name,
            dataset_split="test",
        )
        out.append(
            HubEvalResult(
                **common,
                metric_type="attack_success_rate",
                metric_value=_round(after.asr),
                metric_name=f"ASR, {name} (%)",
            )
        )
        if after.ra is not None:
            out.append(
                HubEvalResult(
                    **common,
                    metric_type="robust_accuracy",
                    metric_value=_round(after.ra),
                    metric_name=f"RA, {name} (%)",
                )
            )
        out.append(
            HubEvalResult(
                **common,
                metric_type="der",
                metric_value=_round(der(before, after)),
                metric_name=f"DER, {name} (%, 50 = no change)",
            )
        )
    if scan is not None and scan.get("verdict") is not None:
        common = dict(
            task_type=_TASK,
            task_name="Backdoor scan of the base model (adversarial neuron noise)",
            dataset_type=scan_data,
            dataset_name=scan_data,
            dataset_config="backdoor-scan",
        )
        out.append(
            HubEvalResult(
                **common,
                metric_type="backdoor_scan_verdict",
                metric_value=str(scan["verdict"]),
                metric_name="Scan verdict (base model, before purification)",
            )
        )
        if isinstance(scan.get("score"), int | float):
            threshold = scan.get("threshold")
            label = f"Scan score (threshold {_short(threshold)})" if threshold is not None else "Scan score"
            out.append(
                HubEvalResult(
                    **common,
                    metric_type="backdoor_scan_score",
                    metric_value=round(float(scan["score"]), 4),
                    metric_name=label,
                )
            )
    return out


def _short(value: Any) -> str:
    """A calibrated threshold as a reader wants it (0.3069, not 0.3069302950329654)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _class_name(index: Any, class_names: Sequence[str] | None) -> str:
    if isinstance(index, int) and class_names and 0 <= index < len(class_names):
        return f"{index} ({class_names[index]})"
    return str(index)


def _scan_section(scan: dict | None, scan_data: str, class_names: Sequence[str] | None) -> list[str]:
    lines = ["## Backdoor scan", ""]
    if scan is None:
        lines.append(
            "No behavioural backdoor scan was run on the base model for this card. Run "
            "`timm-purify scan MODEL` to get one."
        )
        return lines
    verdict = scan.get("verdict", "unknown")
    score, threshold = scan.get("score"), scan.get("threshold")
    desc = (
        f"Before purification the base model was scanned by perturbing its normalisation layers "
        f"with adversarial neuron noise (BAN) on clean images from `{scan_data}` and watching where "
        f"its predictions go: a backdoored model piles them onto its target class."
    )
    lines += [desc, ""]
    found = f"- **Verdict: {verdict}**"
    if isinstance(score, int | float):
        found += (
            f" (score {score:.4f}"
            + (f", threshold {_short(threshold)}" if threshold is not None else "")
            + ")"
        )
    lines.append(found)
    if scan.get("suspected_target") is not None:
        lines.append(f"- Suspected target class: {_class_name(scan['suspected_target'], class_names)}")
    reach = scan.get("reach")
    if isinstance(reach, Mapping) and isinstance(reach.get("score"), int | float):
        # a second stage: it decides only where BAN found nothing (config.decided_by)
        decided_by = (scan.get("config") or {}).get("decided_by")
        role = {
            "reach": " (this stage decided the verdict)",
            "ban+reach": " (it fired too; the noise stage's verdict stands)",
        }.get(decided_by, "")
        lines.append(
            f"- Universal reach (second stage: one small {reach.get('norm')} perturbation per class, shared by "
            f"all images): score {reach['score']:.4f}, threshold {_short(reach.get('threshold'))}, most reachable class "
            f"{_class_name(reach.get('suspected_target'), class_names)}{role}"
        )
    # the all-to-all readings: they decide only where the stages before them found nothing
    decided = (scan.get("config") or {}).get("decided_by") == "spread"
    spread = scan.get("spread") if isinstance(scan.get("spread"), Mapping) else None
    for reading in spread_readings(spread):
        if not isinstance(reading.get("score"), int | float):
            continue
        what = {
            "window": "one pattern shared by all images, pasted in each window of a grid in turn",
            "blend": "one pattern shared by all images, blended into the whole image",
        }.get(reading.get("shape"), "one untargeted L2 perturbation shared by all images")
        lines.append(
            f"- {SPREAD_NAMES.get(reading.get('shape'), 'universal spread').capitalize()} (all-to-all reading: "
            f"{what}, how many classes it moves, each elsewhere): score {reading['score']:.4f}, threshold "
            f"{_short(reading.get('threshold'))}"
            + (" (this reading decided the verdict)" if decided and reading is spread else "")
            # one that fired after it: it names the trigger's shape (method="auto" passes it to AWM)
            + (" (fired too)" if reading is not spread and reading.get("fired") else "")
        )
    skipped = (scan.get("config") or {}).get("skipped_stages") or []
    if skipped:  # calibrated for this model's family, but the verdict and target already stood
        lines.append(
            "- Not run, as they could not change the verdict or target: "
            + ", ".join(stage_label(scan.get("config") or {}, stage) for stage in skipped)
        )
    if scan.get("pattern"):
        lines.append(f"- Pattern: {scan['pattern']}")
    record = _reliability(scan.get("config") or {})
    if record:
        lines.append(record)
    if scan.get("clean_acc") is not None or scan.get("noisy_acc") is not None:
        lines.append(
            f"- Accuracy on the scan images: {_pct(scan.get('clean_acc'))} without noise, "
            f"{_pct(scan.get('noisy_acc'))} with noise"
        )
    if scan.get("seconds") is not None:
        lines.append(f"- Scan time: {float(scan['seconds']):.1f} s (seed {scan.get('seed')})")
    findings = scan.get("static_findings") or []
    serious = [f for f in findings if isinstance(f, Mapping) and f.get("severity") in ("warning", "critical")]
    if findings and not serious:
        lines.append("- Static inspection of the weight files: nothing unsafe found.")
    for f in serious:
        lines.append(f"- Static inspection: [{f.get('severity')}] {f.get('kind')}: {f.get('message')}")
    return lines


def _reliability(config: Mapping) -> str | None:
    """How far the verdict can be trusted: the scan's record on the calibration models of the
    model's normalisation family and, where one was counted at the same cuts, on held-out models
    no fit saw (``None`` where the scan ran with thresholds of the caller's own)."""
    rel = config.get("calibration_reliability")
    if not isinstance(rel, Mapping):
        return None

    def counts(r: Mapping) -> str:
        return (
            f"detected {r['detected']}/{r['backdoored_models']} backdoored models, flagged "
            f"{r['false_positives']}/{r['clean_models']} clean ones, named the right target for "
            f"{r['targets_correct']} of the {all_to_one_found(r)} "
            "all-to-one backdoors found"
        )

    line = (
        f"- Record of this scan on its calibration models ({config.get('norm_family')} normalisation: "
        f"{', '.join(rel.get('archs') or [])}): {counts(rel)}"
    )
    held = (config.get("calibration_heldout") or {}).get("record")
    if isinstance(held, Mapping):
        line += (
            f"; on {held['clean_models'] + held['backdoored_models']} held-out models of seeds no fit saw: "
            f"{counts(held)}"
        )
    return line + "."


def _purification_section(result, save_form: str, fold_note: str | None) -> list[str]:
    lines = ["## Purification", ""]
    if result is None:
        lines.append("This folder was written from a model object without a purification record.")
    else:
        from ..defenses import DEFENSES

        spec = DEFENSES.get(result.method)
        summary = f": {spec.summary}" if spec is not None else ""
        lines += [
            f"- Method: `{result.method}`{summary}",
            f"- Clean data: {result.num_clean} images from `{result.data}`",
            f"- Seed: {result.seed}",
            f"- Wall time of the method: {result.seconds:.1f} s",
            "",
            "<details><summary>Every option used</summary>",
            "",
            "| option | value |",
            "|---|---|",
        ]
        for key, value in sorted(result.config.items()):
            lines.append(f"| `{key}` | `{json.dumps(value)}` |")
        lines += ["", "</details>"]
    lines.append("")
    if save_form == "folded":
        lines.append(
            "The trained polarizer was **folded** into the layer it feeds (an exact affine merge, "
            "checked on random inputs), so this is a plain timm model with the base model's keys."
        )
    elif save_form == "polarizer":
        lines.append(
            "The polarizer is stored **beside** the unchanged base weights "
            "(`polarizer.safetensors`, `polarizer_config.json`)"
            + (f" because it could not be folded: {fold_note}." if fold_note else ".")
        )
    else:
        lines.append("The weights are a plain timm model with the base model's keys (any masks merged).")
    return lines


def _results_section(
    evaluations: dict[str, tuple[EvalResult, EvalResult]], plot_files: Sequence[str]
) -> list[str]:
    lines = ["## Results", ""]
    if not evaluations:
        lines.append(
            "No evaluation was recorded. Evaluate with `timm-purify evaluate MODEL --attack attack.json`."
        )
    else:
        lines += [
            "| attack | test set | ACC before | ACC after | ASR before | ASR after | RA before | RA after | DER |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, (before, after) in evaluations.items():
            has_asr = before.asr is not None and after.asr is not None
            lines.append(
                f"| {name} | {after.data or before.data or ''} (n={after.n_clean}) | {_pct(before.acc)} | "
                f"{_pct(after.acc)} | {_pct(before.asr)} | {_pct(after.asr)} | {_pct(before.ra)} | "
                f"{_pct(after.ra)} | {_pct(der(before, after)) if has_asr else 'n/a'} |"
            )
        lines += [
            "",
            "ACC: clean accuracy. ASR: share of triggered non-target test images classified as the "
            "target. RA: share of triggered images still classified correctly. "
            "DER = (max(0, ASR drop) - max(0, ACC drop) + 1) / 2 (50% means no change).",
        ]
    for name in plot_files:
        caption = PLOT_CAPTIONS.get(name, name.rsplit(".", 1)[0].replace("_", " "))
        lines += ["", f"![{caption}]({name})"]
    return lines


def _usage_section(save_form: str, repo_id: str | None, conditional: bool) -> list[str]:
    where = f"hf-hub:{repo_id}" if repo_id else "local-dir:/path/to/this/folder"
    lines = ["## How to load", ""]
    if save_form == "polarizer":
        lines += [
            "This folder holds the base model **and** a polarizer; `timm.create_model` alone loads the "
            "base model *without* the defence. Load both with timm-purify:",
            "",
            "```python",
            "import timm_purify",
            "",
            f'model = timm_purify.from_pretrained("{repo_id or "/path/to/this/folder"}").eval()',
            "```",
        ]
        if conditional:
            lines += [
                "",
                "The polarizer is class-conditional (CNPD): every prediction runs the base model once to "
                "get its predicted class, then again with the matching polarizer, so inference costs "
                "**two forward passes**.",
            ]
    else:
        lines += [
            "A plain timm model: vanilla timm loads it, no timm-purify needed.",
            "",
            "```python",
            "import timm",
            "",
            f'model = timm.create_model("{where}", pretrained=True).eval()',
            "config = timm.data.resolve_model_data_config(model)",
            "transform = timm.data.create_transform(**config, is_training=False)",
            "```",
        ]
    return lines


def _scope_section(evaluations: dict[str, tuple[EvalResult, EvalResult]], scan: dict | None) -> list[str]:
    attacks = [n for n, (b, a) in evaluations.items() if a.asr is not None and b.asr is not None]
    lines = ["## Scope of the claims", ""]
    if attacks:
        lines.append(
            f"- Purification was evaluated against: {', '.join(f'`{a}`' for a in attacks)}. Other triggers, "
            "attacks and target classes were not tested; the numbers above say nothing about them."
        )
    else:
        lines.append(
            "- No attack was evaluated: there is no measurement here that the backdoor, if any, was removed."
        )
    lines.append(
        "- All figures were measured on the test sets named above, at the model's input size; "
        "other data distributions may behave differently."
    )
    if scan is not None:
        lines.append(
            "- The scan is a statistical test with false negatives and false positives: a *clean* "
            "verdict is evidence, not a proof that no backdoor exists."
        )
    lines.append(
        "- Purification lowers the measured ASR; it does not certify the model. Keep evaluating it on "
        "the triggers you care about."
    )
    return lines


def build_model_card(
    *,
    result=None,
    scan_report=None,
    evaluations: Mapping[str, tuple[EvalResult, EvalResult]] | None = None,
    base_model: str,
    command: str | None,
    plot_files: Sequence[str],
    license: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    save_form: str = "plain",
    fold_note: str | None = None,
    conditional: bool = False,
    class_names: Sequence[str] | None = None,
    environment: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The model card of a purified (or just saved) model.

    Args:
        result: the :class:`~timm_purify.defenses.PurifyResult` (method, options, clean data,
            time, before/after evaluation); its before/after pair joins ``evaluations``.
        scan_report: a ``ScanReport`` or its ``to_dict()``, from scanning the base model.
        evaluations: more ``{attack name: (before, after)}`` pairs.
        base_model: where the input model came from; a Hub id goes into ``base_model``.
        command: the command line that reproduces this folder.
        plot_files: figure files (relative to the card) to embed, e.g. from
            :func:`~timm_purify.hub_cards.plots.write_plots`.
        license: SPDX id for the ``license`` field (None: left out; set it to the base model's).
        model_name: name in the ``model-index`` (default: the repo name or a derived one).
        repo_id: the Hub repository the folder will be pushed to, for the loading snippet.
        save_form: ``"plain"``, ``"folded"`` or ``"polarizer"`` (how the weights are stored).
        fold_note: why a polarizer was or was not folded.
        conditional: the polarizer is class-conditional (two forward passes at inference).
        class_names: label names, to name the suspected target class.
        environment: library versions to record (``timm_purify._train.environment_info()``).
    """
    if save_form not in SAVE_FORMS:
        raise ValueError(f"save_form must be one of {SAVE_FORMS}, got {save_form!r}")
    scan = _scan_dict(scan_report)
    evals = merge_evaluations(result, evaluations)
    class_names = class_names or (scan or {}).get("class_names")
    method = result.method if result is not None else None
    short = (hub_model_id(base_model) or base_model).rstrip("/").split("/")[-1].split(":")[-1] or "model"
    name = model_name or (repo_id.split("/")[-1] if repo_id else f"{short}-{method or 'saved'}-purified")
    scan_config = (scan or {}).get("config") or {}
    scan_data = str(
        scan_config.get("data") or (result.data if result is not None else None) or "clean images"
    )
    tags = list(TAGS) + ([method] if method else [])
    hub_results = _eval_results(evals, scan, scan_data)
    data = ModelCardData(
        base_model=hub_model_id(base_model),
        library_name="timm",
        license=license,
        pipeline_tag="image-classification",
        tags=tags,
        model_name=name,
        eval_results=hub_results or None,
    )
    title = f"# {name}"
    intro = f"`{base_model}` after backdoor purification with timm-purify {__version__}" + (
        f" (method `{method}`)." if method else "."
    )
    body: list[str] = [title, "", intro, ""]
    if save_form == "polarizer":
        body += [
            "> **Warning:** `model.safetensors` holds the *unpurified* base weights; the defence is in "
            "`polarizer.safetensors`. `timm.create_model` alone gives the base model. Use "
            "`timm_purify.from_pretrained` (see *How to load*).",
            "",
        ]
    body += _scan_section(scan, scan_data, class_names) + [""]
    body += _purification_section(result, save_form, fold_note) + [""]
    body += _results_section(evals, plot_files) + [""]
    body += _usage_section(save_form, repo_id, conditional) + [""]
    body += ["## Reproduce", ""]
    if command:
        body += ["```bash", command, "```"]
    else:
        body.append("The command that produced this folder was not recorded.")
    body += [""] + _scope_section(evals, scan) + [""]
    if environment:
        body += ["## Environment", ""]
        body += [f"- {k}: {v}" for k, v in environment.items() if v is not None]
        body.append("")
    text = "---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body).rstrip("\n") + "\n"
    return ModelCard(text)
