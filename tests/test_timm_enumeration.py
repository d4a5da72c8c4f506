"""Reach by enumeration: every model module timm registers, through its smallest entrypoint, and the
variants that reach every other attention, rotary-embedding and MLP class timm's entrypoints build, under
PATT, the adapter and LoRA (tests/timm_sweep.py says how the entrypoints and their tiny configurations
are chosen, and what "works", "refused" and "FAILS" mean; tests/timm_variants.py how the variants are).

Every module is expected to work unless EXPECTED names its refusal, with the reason matched by a
regex: a family that starts to work, or breaks, or is refused for another reason, fails the test. A
FAILS outcome (an exception that is not a SurgeryError, a refused apply that changed the model, a
forward that fails after apply, a remove that does not restore the model) always fails it. The full
contract on these families is the family tests' (test_families_*.py).
"""

from __future__ import annotations

import json
import re
from typing import Dict

import pytest
import timm
from timm_sweep import TABLE, build, load_table, registered_modules, sweep
from timm_variants import VARIANTS, check_holds, module_of, variant_entries

from petl_surgery.sites import discover

pytestmark = pytest.mark.slow  # a family sweep: -m "not slow" leaves it out

METHODS = ("patt", "adapter", "lora")
WORKS = "works"
REGISTERED = registered_modules()
ENTRIES = load_table()

NO_BLOCK = r"found no transformer block that petl_surgery can operate on"


def unsupported(*classes: str) -> str:
    """The refusal of a model holding attention of these classes that no layout describes."""
    return r"has attention modules petl_surgery cannot operate on: .*\((?:" + "|".join(classes) + r")\)"


# No transformer block, for every method of the sweep: CNNs, MLP mixers, LSTM/state-space/pooling/
# modulation mixers (Sequencer, EfficientViM, PoolFormer, FocalNet, FastViT-T8's RepMixer); SHViT and
# iFormer hold single-head attention under names discovery does not take for attention (SHSA, SHMA).
NO_BLOCK_MODULES = (
    "byobnet", "convmixer", "cspnet", "cspnext", "densenet", "dla", "dpn", "efficientnet", "efficientvim",
    "fasternet", "fastvit", "focalnet", "ghostnet", "hardcorenas", "hgnet", "hrnet", "iformer", "inception_next",
    "inception_resnet_v2", "inception_v3", "inception_v4", "lcnetv2", "mambaout", "metaformer", "mlp_mixer",
    "mobilenetv3", "nasnet", "nfnet", "pnasnet", "rdnet", "regnet", "repghost", "repvit", "res2net", "resnest",
    "resnet", "resnetv2", "rexnet", "selecsls", "senet", "sequencer", "shvit", "sknet", "starnet", "tresnet", "vgg",
    "vovnet", "xception", "xception_aligned",
)
NO_QV = r"targets q, v of method 'lora' are not available in block \d+ .*\({}\)"
# module -> the refusal's regex for every method of the sweep, or method -> regex (others work).
EXPECTED: Dict[str, object] = {
    **dict.fromkeys(NO_BLOCK_MODULES, NO_BLOCK),
    # ConvNeXt's blocks have an MLP and no attention: the adapter works on them (sites/timm_convnets.py)
    "convnext": {"patt": r"needs an attention in block 0", "lora": r"needs an attention in block 0"},
    # real attention whose layout no registered class describes
    "byoanet": unsupported("SelfAttnBlock"),  # HaloNet's halo attention, inside its SelfAttnBlock
    "coat": unsupported("FactorAttnConvRelPosEnc"),  # three factorised attentions per parallel block
    "cpubone": unsupported("ConvAttention"),
    "lowformer": unsupported("ConvAttention"),
    "gemma4_vit": unsupported("Gemma4Attention"),
    "mobilenetv5": {"adapter": r"needs an MLP in block 0"},  # MobileAttention blocks have no MLP
    # attention that is not a softmax over tokens, or blocks without an MLP (see the family tests)
    "crossvit": {"adapter": r"needs an MLP in block \d+ \('blocks\.0\.fusion\.0'\)"},
    "efficientformer_v2": {"adapter": r"needs an MLP in block \d+ \('stages\.3\.downsample'\)"},
    "davit": {"patt": r"\(ChannelAttention(?:V2)?\) attends over channels", "lora": NO_QV.format("ChannelAttention(?:V2)?")},
    "edgenext": {"patt": r"\(CrossCovarianceAttn\) is cross-covariance attention", "lora": NO_QV.format("CrossCovarianceAttn")},
    "efficientvit_mit": {"patt": r"\(LiteMLA\) is ReLU linear attention", "lora": NO_QV.format("LiteMLA")},
    "efficientvit_msra": {
        "patt": r"\(LocalWindowAttention\) is cascaded group attention",
        "lora": NO_QV.format("LocalWindowAttention"),
    },
    "swiftformer": {
        "patt": r"\(EfficientAdditiveAttention\) is additive attention",
        "lora": NO_QV.format("EfficientAdditiveAttention"),
    },
    "volo": {
        "patt": r"\(OutlookAttention\) is outlook attention",
        "lora": r"targets q of method 'lora' are not available .*\(OutlookAttention\) offers v, proj",
    },
    "xcit": {"patt": r"\(XCA\) is cross-covariance attention"},
    # GCViT's global blocks take q from the stage's global query generator
    "gcvit": {"lora": r"targets q of method 'lora' are not available .*\(WindowAttentionGlobal\) offers k, v, proj"},
}


# entrypoint -> its expectation where a variant differs from its module's smallest model (as EXPECTED)
EXPECTED_MODELS: Dict[str, object] = {
    # attention-holding variants of modules whose smallest model has none
    "caformer_s18": WORKS,
    "fastvit_mci0": WORKS,
    "bat_resnext26ts": unsupported("BatNonLocalAttn"),  # non-local attention inside a ResNeXt bottleneck
    # MaxViT's parallel partition attention runs window and grid attention side by side, each on half the
    # channels, before one MLP: a second attention in one block, which no layout describes
    "maxvit_tiny_pm_256": unsupported("AttentionCl"),
    "mobilevitv2_050": {
        "patt": r"\(LinearSelfAttention\) is separable linear attention",
        "lora": NO_QV.format("LinearSelfAttention"),
    },
    # the differential parallel block fuses its output projection over [attention | MLP]: no MLP of its own
    "vit_dpwee_patch16_reg1_gap_256": {"adapter": r"needs an MLP in block 0 \('blocks\.0'\)"},
}


def expected(module: str, method: str, model: str = "") -> str:
    entry = EXPECTED_MODELS.get(model, EXPECTED.get(module, WORKS))
    return entry if isinstance(entry, str) else entry.get(method, WORKS)


def test_the_table_holds_every_registered_module() -> None:
    missing = sorted(set(REGISTERED) - set(ENTRIES))
    assert not missing, f"{TABLE.name} lacks {missing}: run python docs/make_coverage.py --timm-table"
    stale = sorted(m for m in REGISTERED if ENTRIES[m]["model"] not in REGISTERED[m])
    assert not stale, f"{TABLE.name}'s entrypoints of {stale} are not registered: run python docs/make_coverage.py --timm-table"


def test_expected_refusals_name_tabled_modules_only() -> None:
    """An expectation for a module the table does not hold is stale (the table keeps modules of either
    timm version: cspnext is newer than 1.0.30)."""
    assert sorted(set(EXPECTED) - set(ENTRIES)) == []


def _outcomes_as_expected(module: str, entry: Dict[str, object]) -> None:
    outcomes = sweep(entry, METHODS)
    wrong = {}
    for method, outcome in outcomes.items():
        want = expected(module, method, entry["model"])
        if want == WORKS:
            ok = outcome == WORKS
        else:
            ok = outcome.startswith("refused: ") and re.search(want, outcome) is not None
        if not ok:
            wrong[method] = (outcome, want)
    assert not wrong, f"{module} ({entry['model']}): " + "; ".join(
        f"{method}: got {got!r}, expected {want!r}" for method, (got, want) in wrong.items()
    )


@pytest.mark.parametrize("module", sorted(REGISTERED))
def test_every_module_works_or_is_refused_with_its_reason(module: str) -> None:
    _outcomes_as_expected(module, ENTRIES[module])


VARIANT_ENTRIES = {entry["model"]: entry for entry in variant_entries()}


def _registered_variant(model: str) -> Dict[str, object]:
    """The variant entry of ``model``, or a skip naming the installed timm when it does not register it."""
    if module_of(model) is None:
        pytest.skip(f"{model} is not registered in timm {timm.__version__} (a variant of another timm version)")
    return VARIANT_ENTRIES[model]


@pytest.mark.parametrize("model", sorted(VARIANT_ENTRIES))
def test_every_variant_works_or_is_refused_with_its_reason(model: str) -> None:
    _outcomes_as_expected(module_of(model) or "", _registered_variant(model))


@pytest.mark.parametrize("model", sorted(VARIANT_ENTRIES))
def test_every_variant_builds_the_classes_it_was_chosen_for(model: str) -> None:
    assert check_holds(_registered_variant(model)) == set(), f"run python docs/make_coverage.py --timm-variants"


def test_expected_models_name_variants() -> None:
    assert sorted(set(EXPECTED_MODELS) - set(VARIANT_ENTRIES)) == []


def test_every_swept_class_is_built_by_an_entrypoint_of_the_sweep() -> None:
    """Each class of the census (tests/timm_variants.json) is built by the tiny configuration of the
    smallest entrypoint or variant it is credited to (variants: the test above), so the sweep reaches it."""
    credited: Dict[str, set] = {}
    for cls, model in json.loads(VARIANTS.read_text())["classes"].items():
        credited.setdefault(model, set()).add(cls)
    smallest = {entry["model"]: entry for entry in ENTRIES.values()}
    assert set(credited) <= set(smallest) | set(VARIANT_ENTRIES)
    variant_classes = {model: set(entry["classes"]) for model, entry in VARIANT_ENTRIES.items()}
    lacking = {
        model: sorted(check_holds(dict(smallest[model], classes=sorted(classes - variant_classes.get(model, set())))))
        for model, classes in credited.items()
        if model in smallest and module_of(model) is not None
    }
    assert {model: lacks for model, lacks in lacking.items() if lacks} == {}, "run python docs/make_coverage.py --timm-variants"


# module -> a class in its smallest model that only looks like attention (by name, or by num_heads)
LOOKALIKES = {
    "resnest": "SplitAttn",  # split attention: a channel gate over radix groups
    "sknet": "SelectiveKernelAttn",  # a gate choosing between kernel sizes
    "csatv2": "SpatialAttention",  # a spatial gate
    "eva": "RotaryEmbeddingDinoV3",  # a rotary embedding
}


@pytest.mark.parametrize("module", sorted(LOOKALIKES))
def test_what_only_looks_like_attention_never_refuses_a_model(module: str) -> None:
    model = build(ENTRIES[module], device="meta")
    assert LOOKALIKES[module] in {type(m).__name__ for m in model.modules()}
    assert discover(model).unsupported == []
