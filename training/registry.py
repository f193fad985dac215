"""Promotion and rollback of registered churn model versions, with stages and aliases kept in step.

MLflow 3 deprecates stages in favour of aliases, but people still ask for "the Production model", so a version
in stage Production always holds alias ``production`` and a version in Staging alias ``staging``; at most one
version is in each of these stages. A promotion to Production passes a gate first: the candidate must score
at least the current Production's AUC on the candidate's own validation split (``--force`` skips it). Each
version promoted to Production records the version it replaced in the tag ``previous_production``, which is
what ``rollback`` returns to. Moving the Production version to another stage would leave no Production for
servers to follow, so it too needs ``--force``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from datetime import date

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from sklearn.base import ClassifierMixin

from streamflow.errors import StreamflowError
from streamflow.model_contract import ShadowEvidence, combined_evidence, evidence_production_version
from streamflow.settings import Settings
from streamflow.training.train import TAG_AS_OF, mlflow_client, score, validation_frame

log = logging.getLogger(__name__)
# Stages are used on purpose (people ask for them); MLflow's deprecation notice on every call is noise.
warnings.filterwarnings("ignore", message=r".*[Ss]tages.*", category=FutureWarning)

STAGES = ("None", "Staging", "Production", "Archived")
ALIASES = {"Staging": "staging", "Production": "production"}
TAG_PREVIOUS = "previous_production"


class PromotionRefused(StreamflowError):
    """The gate found the candidate worse than the current Production; nothing was changed."""


class ProductionWouldEmpty(StreamflowError):
    """Moving the Production version elsewhere would leave no Production; nothing was changed."""


@dataclass(frozen=True)
class Gate:
    """The AUCs a promotion to Production compared, on the validation split of `as_of`."""

    as_of: date
    candidate_auc: float
    production_version: int
    production_auc: float

    @property
    def passed(self) -> bool:
        """Whether the candidate is at least as good as the current Production."""
        return self.candidate_auc >= self.production_auc


@dataclass(frozen=True)
class Promotion:
    """What a promotion or rollback did."""

    version: int
    stage: str
    previous_production: int | None
    gate: Gate | None


def _stage(stage: str) -> str:
    """The canonical spelling of a stage name (case-insensitive), or a StreamflowError."""
    for known in STAGES:
        if stage.lower() == known.lower():
            return known
    raise StreamflowError(f"There is no stage {stage!r}; use one of {', '.join(STAGES)}.")


def _version(client: MlflowClient, name: str, version: int | str) -> ModelVersion:
    """An existing model version, or a StreamflowError naming what is missing."""
    text = str(version)
    if not text.isdigit() or int(text) < 1:
        raise StreamflowError(f"{text!r} is not a model version; versions are positive numbers like 1 or 2.")
    try:
        return client.get_model_version(name, text)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise StreamflowError(f"Model {name} has no version {text}.") from exc


def current(client: MlflowClient, name: str, stage: str) -> ModelVersion | None:
    """The version of `name` in `stage` (the newest if several), or None."""
    try:
        versions = client.get_latest_versions(name, stages=[stage])
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    return max(versions, key=lambda v: int(v.version), default=None)


def gate(settings: Settings, candidate: ModelVersion, production: ModelVersion) -> Gate:
    """Score the candidate and the current Production on the candidate's validation split."""
    if TAG_AS_OF not in candidate.tags:
        raise StreamflowError(
            f"Version {candidate.version} has no {TAG_AS_OF} tag, so the gate cannot rebuild its validation "
            "split; promote it with --force if it is what you want."
        )
    as_of = date.fromisoformat(candidate.tags[TAG_AS_OF])
    # The rows the candidate held out: split with the seed it was trained with.
    params = mlflow_client(settings).get_run(str(candidate.run_id)).data.params
    validation = validation_frame(settings, as_of, seed=int(params.get("random_state", settings.seed)))
    aucs = [score(_load(settings, v), validation)["val_auc"] for v in (candidate, production)]
    return Gate(as_of, aucs[0], int(production.version), aucs[1])


def _load(settings: Settings, version: ModelVersion) -> ClassifierMixin:
    try:
        model: ClassifierMixin = mlflow.sklearn.load_model(f"models:/{settings.model_name}/{version.version}")
    except (MlflowException, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StreamflowError(
            f"Version {version.version} of {settings.model_name} cannot be loaded for the gate ({reason})."
        ) from exc
    return model


def _move(client: MlflowClient, name: str, version: ModelVersion, stage: str) -> None:
    """Put one version into `stage` and make the aliases agree with the stages afterwards."""
    # Other versions in Staging/Production are archived, so each of those stages holds one version.
    client.transition_model_version_stage(
        name, version.version, stage, archive_existing_versions=stage in ALIASES
    )
    for alias_stage, alias in ALIASES.items():
        if alias_stage == stage:
            client.set_registered_model_alias(name, alias, version.version)
        elif alias in version.aliases:
            client.delete_registered_model_alias(name, alias)


@dataclass(frozen=True)
class EvidenceRequired:
    """What `promote` asks of a candidate's shadow evidence (server/shadow_evidence.py records it)."""

    min_users: int | None = None
    min_agreement: float | None = None

    @property
    def any(self) -> bool:
        return self.min_users is not None or self.min_agreement is not None


def check_shadow_evidence(
    candidate: ModelVersion, production: ModelVersion | None, required: EvidenceRequired
) -> ShadowEvidence:
    """The candidate's evidence as a shadow of the current Production; raises `PromotionRefused` with one
    sentence when it is missing, against another Production version, or short of `required`."""
    number = candidate.version
    against = {
        tag: (version, text)
        for tag, text in (candidate.tags or {}).items()
        if (version := evidence_production_version(tag)) is not None
    }
    recorded = sorted({version for version, _ in against.values()})
    if production is None:
        raise PromotionRefused(
            f"Version {number} has no shadow evidence: there is no Production version to compare it with."
        )
    if not recorded:
        raise PromotionRefused(
            f"Version {number} has no shadow evidence; serve it as the shadow (STREAMFLOW_SHADOW_MODEL_URI) "
            f"beside Production version {production.version} first."
        )
    texts = {tag: text for tag, (version, text) in against.items() if version == str(production.version)}
    if not texts:
        raise PromotionRefused(
            f"Version {number}'s shadow evidence is against Production version(s) {', '.join(recorded)}, not "
            f"the current Production version {production.version}; let it shadow version "
            f"{production.version} first."
        )
    runs = []
    for tag, text in sorted(texts.items()):
        try:
            runs.append(ShadowEvidence.from_json(text))
        except (ValueError, KeyError, TypeError) as exc:
            raise PromotionRefused(f"Version {number}'s shadow evidence tag {tag} is unreadable.") from exc
    evidence = combined_evidence(runs)  # every server run that compared it with this Production version
    if required.min_users is not None and evidence.users < required.min_users:
        raise PromotionRefused(
            f"Version {number} was compared with Production version {production.version} on "
            f"{evidence.users} users as a shadow, fewer than the {required.min_users} required."
        )
    if required.min_agreement is not None and evidence.label_agreement < required.min_agreement:
        raise PromotionRefused(
            f"Version {number} agreed with Production version {production.version} on "
            f"{evidence.label_agreement:.2%} of {evidence.users} users, below the "
            f"{required.min_agreement:.2%} required."
        )
    return evidence


def promote(
    settings: Settings,
    version: int | str,
    stage: str,
    force: bool = False,
    evidence: EvidenceRequired | None = None,
) -> Promotion:
    """Move `version` to `stage` (None, Staging, Production, Archived); a refusal changes nothing.

    `evidence` (to Production only) requires the version's shadow evidence against the current Production
    version; `force` skips the AUC gate, never the evidence a caller asked for."""
    target = _stage(stage)
    client = mlflow_client(settings)
    name = settings.model_name
    candidate = _version(client, name, version)
    number = int(candidate.version)
    if target != "Production":
        if candidate.current_stage == "Production" and not force:
            raise ProductionWouldEmpty(
                f"Version {number} is the Production version of {name} and moving it to {target} would leave "
                "no Production for servers to follow; promote another version first, or pass --force."
            )
        _move(client, name, candidate, target)
        log.info("%s version %d is now in %s", name, number, target)
        return Promotion(number, target, None, None)

    production = current(client, name, "Production")
    if production is not None and int(production.version) == number:
        _move(client, name, candidate, target)  # already there; re-asserting repairs a drifted alias
        return Promotion(number, target, None, None)
    if evidence is not None and evidence.any:
        shown = check_shadow_evidence(candidate, production, evidence)
        log.info(
            "shadow evidence against Production version %s: %d users, label agreement %.2f%%",
            shown.production_version,
            shown.users,
            100 * shown.label_agreement,
        )
    checked = None
    if production is not None and not force:
        checked = gate(settings, candidate, production)
        log.info(
            "gate on the %s validation split: candidate AUC %.4f, Production (version %d) AUC %.4f",
            checked.as_of,
            checked.candidate_auc,
            checked.production_version,
            checked.production_auc,
        )
        if not checked.passed:
            raise PromotionRefused(
                f"Version {number} scores AUC {checked.candidate_auc:.4f} on the {checked.as_of} "
                f"validation split, below Production version {checked.production_version}'s "
                f"{checked.production_auc:.4f}; pass --force to promote it anyway."
            )
    previous = None if production is None else int(production.version)
    if previous is not None:
        client.set_model_version_tag(name, candidate.version, TAG_PREVIOUS, str(previous))
    elif TAG_PREVIOUS in candidate.tags:  # left from an earlier spell in Production; it replaces nothing now
        client.delete_model_version_tag(name, candidate.version, TAG_PREVIOUS)
    _move(client, name, candidate, target)
    log.info("%s version %d is now in Production (was: %s)", name, number, previous or "none")
    return Promotion(number, target, previous, checked)


def rollback(settings: Settings) -> Promotion:
    """Put the version the current Production replaced back into Production; the current one is archived."""
    client = mlflow_client(settings)
    name = settings.model_name
    production = current(client, name, "Production")
    if production is None:
        raise StreamflowError(f"Model {name} has no Production version to roll back.")
    previous = production.tags.get(TAG_PREVIOUS)
    if previous is None:
        raise StreamflowError(
            f"Production version {production.version} of {name} replaced no earlier version, "
            "so there is nothing to roll back to."
        )
    target = _version(client, name, previous)
    # The restored version keeps its own `previous_production`: a second rollback goes one step further back.
    _move(client, name, target, "Production")
    log.info("rolled %s back from version %s to version %s", name, production.version, target.version)
    return Promotion(int(target.version), "Production", int(production.version), None)
