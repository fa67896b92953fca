"""Property-based tests of every parser and constructor a user can reach (issue 12).

For any input, each must either return a valid object or raise `WorkbenchError` whose message
starts with the field it is about (`plan.tp: …`, `nodes[0].gpus: …`, `--bytes: …`), is bounded in
length, and arrives within the deadline. Inputs mix the plausible (near-valid specs with one bad
value) with the hostile (nan, inf, 1e400, full-width digits, huge numbers, deep nesting, aliases).
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.errors import WorkbenchError

# A message starts with the field: a name (optionally --flag), then .sub / [i] parts, then ": ".
FIELD = re.compile(r"^(--)?[A-Za-z][\w\-]*( file)?((\.[\w\-]+)|(\[\d+\]))*: \S")
FUZZ = settings(max_examples=60, deadline=3000, suppress_health_check=[HealthCheck.too_slow])


def clean(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args)`, or None after checking its WorkbenchError names a field and is bounded."""
    try:
        return fn(*args, **kwargs)
    except WorkbenchError as exc:
        msg = str(exc)
        assert FIELD.match(msg), f"message does not start with a field: {msg[:300]!r}"
        assert len(msg) <= WorkbenchError.MAX_MESSAGE + 10, len(msg)
        return None


# ---------------------------------------------------------------------------------------------
# numbers as users write them
HOSTILE_NUMBERS = ["nan", "NaN", "inf", "-inf", ".inf", "1e400", "-1", "-0", "0", "1.5", "32.5", "1e-9",
                   "１２", "٣", "8\u00a0", "0x10", "1_000", "9" * 50, "9" * 5000, "", " ", "+4", "4.0", "1e3",
                   "true", "[]", "{}", "null", "~"]
numbers_text = st.one_of(st.sampled_from(HOSTILE_NUMBERS), st.integers(-10**20, 10**20).map(str),
                         st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=12))
numbers_any = st.one_of(numbers_text, st.integers(-10**20, 10**20), st.floats(), st.booleans(), st.none(),
                        st.lists(st.integers(), max_size=3))


@FUZZ
@given(numbers_any)
def test_sizes(value: Any) -> None:
    from workbench.units import MAX_SIZE, parse_size

    n = clean(parse_size, value, "--bytes")
    if n is not None:
        assert isinstance(n, int) and 0 <= n <= MAX_SIZE


@FUZZ
@given(numbers_any, st.integers(0, 5), st.integers(5, 10**6))
def test_whole_and_number(value: Any, lo: int, hi: int) -> None:
    from workbench.validate import number, whole

    n = clean(whole, value, "f", lo, hi)
    if n is not None:
        assert isinstance(n, int) and lo <= n <= hi
    x = clean(number, value, "f", float(lo), float(hi))
    if x is not None:
        assert math.isfinite(x) and lo < x <= hi


# ---------------------------------------------------------------------------------------------
# key=value specs: near-valid ones with hostile values, and random text
def spec(keys: list[str]) -> st.SearchStrategy[str]:
    pair = st.tuples(st.sampled_from(keys + ["", "x", "tp", "nodes"]), numbers_text)
    return st.lists(pair, max_size=5).map(lambda ps: ",".join(f"{k}={v}" for k, v in ps))


CLUSTER_KEYS = ["nodes", "gpu", "nics", "oversubscription", "leaf_ports"]
MODEL_KEYS = ["layers", "hidden", "heads", "vocab", "seq", "kv_heads", "head_dim", "ffn", "experts", "top_k",
              "gated", "tied", "dense_layers", "expert_ffn", "kv_lora_rank", "qk_rope_dim"]
PLAN_KEYS = ["tp", "pp", "dp", "ep", "cp", "sp", "vpp", "zero", "fsdp", "recompute", "mbs", "gbs", "precision",
             "offload", "v", "dtype"]


def test_fuzz_properties_reach_their_success_branch() -> None:
    """The properties below check parsed objects only when parsing succeeds: known-good inputs must
    parse (so those checks run) and out-of-range ones must be refused naming the field."""
    from workbench.serving import Traffic
    from workbench.topology import load_cluster
    from workbench.topology.spec import MAX_GPUS

    assert clean(load_cluster, "aws-p5:nodes=2").num_gpus == 16
    assert clean(load_cluster, f"dgx-h100:nodes={MAX_GPUS}") is None
    assert clean(Traffic.parse, "concurrency=4,isl=16,osl=8,requests=10").requests == 10
    assert clean(Traffic.parse, "rate=-1,isl=16,osl=8") is None


@FUZZ
@given(st.sampled_from(["aws-p5", "dgx-h100", "aws-p4d", "nope"]), spec(CLUSTER_KEYS))
def test_cluster_specs(name: str, opts: str) -> None:
    from workbench.topology import load_cluster
    from workbench.topology.spec import MAX_GPUS

    c = clean(load_cluster, f"{name}:{opts}")
    if c is not None:
        assert 1 <= c.num_gpus <= MAX_GPUS


@FUZZ
@given(st.text(max_size=300))
def test_cluster_spec_text(text: str) -> None:
    from workbench.topology import load_cluster

    clean(load_cluster, text)


@FUZZ
@given(st.sampled_from(["gpt", "llama", "moe", "llama3-8b", "mixtral-8x7b"]), spec(MODEL_KEYS))
def test_model_specs(kind: str, opts: str) -> None:
    from workbench.models.presets import load_model

    base = "layers=2,hidden=64,heads=4,vocab=128,seq=32," if kind in ("gpt", "llama", "moe") else ""
    m = clean(load_model, f"{kind}:{base}{opts}".rstrip(",").rstrip(":"))
    if m is not None:
        assert m.layers >= 1 and m.hidden >= 1 and m.heads % m.kv_heads == 0 and m.ffn >= 1
        assert m.summary()["params_B"] >= 0


@FUZZ
@given(spec(PLAN_KEYS))
def test_plan_specs(text: str) -> None:
    from workbench.plan.spec import Plan, parse_plan

    p = clean(parse_plan, text)
    if p is not None:
        assert isinstance(p, Plan) and p.world >= 1
        assert parse_plan(str(p)) == p


# ---------------------------------------------------------------------------------------------
# structured data: cluster files, HF configs, plans as mappings, job files
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(), st.text(max_size=20),
                    st.sampled_from(HOSTILE_NUMBERS))
plain = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                     max_leaves=12)


def near(template: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """The template with some values replaced by hostile ones (and sometimes an unknown key)."""
    keys = list(template)
    return st.fixed_dictionaries({}, optional={k: st.one_of(st.just(v), scalars, plain)
                                               for k, v in template.items()}).map(
        lambda d: {k: d.get(k, template[k]) for k in keys} | {k: v for k, v in d.items() if k not in keys})


NODE = {"gpu": "H100-SXM", "gpus": 8, "intra": "nvswitch", "nic": "EFAv2-100G", "nics": 32, "count": 2,
        "specs": {"fp32_tflops": 50.0}}
FABRIC = {"kind": "rail", "switch": "efa", "leaf_ports": 32, "spines": 8, "oversubscription": 1.0}


@FUZZ
@given(near(NODE), near(FABRIC), st.one_of(st.just("lab"), scalars))
def test_cluster_files(node: dict[str, Any], fabric: dict[str, Any], name: Any) -> None:
    from workbench.topology.spec import MAX_GPUS, from_dict

    c = clean(from_dict, {"name": name, "nodes": [node], "fabric": fabric})
    if c is not None:
        assert 1 <= c.num_gpus <= MAX_GPUS
        assert all(math.isfinite(v) and v > 0 for n in c.nodes for _, v in n.specs)
        assert math.isfinite(c.fabric.oversubscription) and c.fabric.oversubscription > 0


@FUZZ
@given(plain)
def test_cluster_files_any_shape(data: Any) -> None:
    from workbench.topology.spec import from_dict

    clean(from_dict, data)


HF = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8,
      "num_key_value_heads": 4, "vocab_size": 1000, "intermediate_size": 512, "max_position_embeddings": 2048,
      "tie_word_embeddings": False, "hidden_act": "silu", "num_local_experts": 0, "head_dim": 32}


@FUZZ
@given(st.one_of(near(HF), plain))
def test_hf_configs(cfg: Any) -> None:
    from workbench.models.presets import from_hf_config

    m = clean(from_hf_config, cfg)
    if m is not None:
        assert m.layers >= 1 and m.hidden >= 1 and isinstance(m.tied, bool)
        assert m.summary()["params_B"] >= 0


@FUZZ
@given(st.one_of(near({"tp": 2, "pp": 2, "dp": 2, "zero": 1, "recompute": "full", "sp": True, "gbs": 64,
                       "mbs": 1, "precision": "bf16", "offload": False}), plain))
def test_plans_as_mappings(d: Any) -> None:
    from workbench.plan.spec import parse_plan

    p = clean(parse_plan, d)
    if p is not None:
        assert all(getattr(p, f) is None or isinstance(getattr(p, f), int) for f in ("tp", "pp", "dp", "gbs"))


JOB = {"kind": "training", "cluster": "aws-p5:nodes=2", "model": "llama3-8b", "plan": "tp=8,dp=2",
       "workload": {"kind": "training", "steps": 5, "lr": 1e-3, "backend": "gloo", "seed": 0}}


@FUZZ
@given(st.one_of(near(JOB), plain), st.one_of(st.none(), near(JOB["workload"])))  # type: ignore[arg-type]
def test_job_dicts(d: Any, workload: Any) -> None:
    from workbench.core.job import Job

    if isinstance(d, dict) and workload is not None:
        d = d | {"workload": workload}
    job = clean(Job.from_dict, d)
    if job is not None:
        assert job.cluster.num_gpus >= 1 and math.isfinite(job.workload.lr) and job.workload.lr > 0


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 st.sampled_from([b"\xff\xfe", b"[" * 2000, b"a: &a [*a]", b"- " * 300 + b"x", b"{}" * 5])))
def test_job_files_of_any_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    from workbench.core.job import Job
    from workbench.topology.spec import load

    path = tmp_path_factory.mktemp("f") / "job.yaml"
    path.write_bytes(data)
    clean(Job.load, path)
    clean(load, path)


# ---------------------------------------------------------------------------------------------
# the hostile classes of issue 12, each a plain example that failed before
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(9))


@pytest.mark.parametrize(("call", "field"), [
    (lambda: __import__("workbench.topology", fromlist=["x"]).load_cluster("aws-p5:oversubscription=nan"),
     "aws-p5.oversubscription"),
    (lambda: __import__("workbench.topology", fromlist=["x"]).load_cluster("aws-p5:nodes=100000"), "aws-p5.nodes"),
    (lambda: __import__("workbench.topology", fromlist=["x"]).load_cluster("x" * 300), "cluster"),
    (lambda: __import__("workbench.topology", fromlist=["x"]).load_cluster("/"), "cluster"),
    (lambda: __import__("workbench.topology.spec", fromlist=["x"]).loads("nodes: [{gpu: H100-SXM, gpus: .inf}]"),
     "nodes[0].gpus"),
    (lambda: __import__("workbench.topology.spec", fromlist=["x"]).loads("nodes: [{gpu: CPU, gpus: 1000000000}]"),
     "nodes[0].gpus"),
    (lambda: __import__("workbench.topology.spec", fromlist=["x"]).loads(
        "nodes: [{gpu: CPU, gpus: 1, specs: {fp32_tflops: .nan}}]"), "nodes[0].specs.fp32_tflops"),
    (lambda: __import__("workbench.topology.spec", fromlist=["x"]).loads(BOMB), "cluster file"),
    (lambda: __import__("workbench.topology.spec", fromlist=["x"]).loads("[" * 1000 + "]" * 1000), "cluster file"),
    (lambda: __import__("workbench.units", fromlist=["x"]).parse_size("1e400", "--bytes"), "--bytes"),
    (lambda: __import__("workbench.units", fromlist=["x"]).parse_size("1e-9", "--bytes"), "--bytes"),
    (lambda: __import__("workbench.models.presets", fromlist=["x"]).load_model(
        "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32,ffn=-100000"), "model.ffn"),
    (lambda: __import__("workbench.models.presets", fromlist=["x"]).load_model(
        "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32,head_dim=-1"), "model.head_dim"),
    (lambda: __import__("workbench.models.presets", fromlist=["x"]).load_model(
        "gpt:layers=２,hidden=64,heads=4,vocab=128,seq=32"), "model.layers"),
    (lambda: __import__("workbench.models.presets", fromlist=["x"]).from_hf_config(
        HF | {"num_hidden_layers": float("nan")}), "model.num_hidden_layers"),
    (lambda: __import__("workbench.models.presets", fromlist=["x"]).from_hf_config(
        HF | {"num_hidden_layers": 10**12}), "model.num_hidden_layers"),
    (lambda: __import__("workbench.models.presets", fromlist=["x"]).from_hf_config(
        HF | {"num_hidden_layers": 32.5}), "model.num_hidden_layers"),
    (lambda: __import__("workbench.models.presets", fromlist=["x"]).from_hf_config(
        HF | {"hidden_size": "256"}), "model.hidden_size"),
    (lambda: __import__("workbench.models.presets", fromlist=["x"]).from_hf_config(
        HF | {"tie_word_embeddings": "no"}), "model.tie_word_embeddings"),
    (lambda: __import__("workbench.models.presets", fromlist=["x"]).from_hf_config([]), "model"),
    (lambda: __import__("workbench.models.presets", fromlist=["x"]).from_hf_config("llama"), "model"),
    (lambda: __import__("workbench.models.presets", fromlist=["x"]).from_hf_config(None), "model"),
    (lambda: __import__("workbench.plan.spec", fromlist=["x"]).parse_plan("tp=8,tp=4"), "plan"),
    (lambda: __import__("workbench.plan.spec", fromlist=["x"]).parse_plan("tp=8,dp=nan"), "plan.dp"),
    (lambda: __import__("workbench.plan.spec", fromlist=["x"]).parse_plan("fsdp=maybe"), "plan.fsdp"),
])
def test_hostile_examples(call: Any, field: str) -> None:
    with pytest.raises(WorkbenchError) as exc:
        call()
    assert str(exc.value).startswith(field + ":") or str(exc.value).startswith(field + " "), str(exc.value)[:300]
    assert len(str(exc.value)) < 600


def test_files_that_are_not_files(tmp_path: Any) -> None:
    from workbench.core.job import Job
    from workbench.models.presets import load_model

    bad = tmp_path / "config.json"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xff")
    for call, field in ((lambda: Job.load(tmp_path), "job"), (lambda: load_model(str(bad)), "model"),
                        (lambda: Job.load("/dev/zero"), "job"), (lambda: Job.load("a" * 300 + ".yaml"), "job")):
        with pytest.raises(WorkbenchError, match=f"^{field}: "):
            call()
