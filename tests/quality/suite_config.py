"""Suite configs (tests/quality/configs/*.json): a name, a method and a
policy config (the plugin's PolicyConfig JSON) whose sizes may depend on the
context length.

- A plain PolicyConfig file (no "name") is a config named by its file stem.
- A string value like "ctx/8 - 32" is an integer expression in `ctx` (the
  scoring sequence's length): + - * / (floor division) and parentheses.
- "@locret_weights" / "@locret_hidden" name the retaining heads the run uses
  (trained heads when the repo has them, else seeded random ones).
- SPARSE_PATH_FIELDS is merged into every non-stock policy: top-level fields
  that force the sparse path (see run.py).
"""
import ast
import json
import operator
import os

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Div: operator.floordiv}


def eval_size(expr, ctx):
    """Integer value of a size expression in `ctx`."""
    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.Name) and n.id == "ctx":
            return ctx
        if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        raise ValueError(f"bad size expression {expr!r}")
    v = ev(ast.parse(expr, mode="eval"))
    if v < 0:
        raise ValueError(f"size expression {expr!r} is negative at ctx={ctx}")
    return v


def instantiate(policy, ctx, subst):
    """The policy with size expressions evaluated and @names substituted."""
    if isinstance(policy, dict):
        return {k: instantiate(v, ctx, subst) for k, v in policy.items()}
    if isinstance(policy, list):
        return [instantiate(v, ctx, subst) for v in policy]
    if isinstance(policy, str):
        if policy.startswith("@"):
            if policy[1:] not in subst:
                raise ValueError(f"unknown placeholder {policy}")
            return subst[policy[1:]]
        if "ctx" in policy:
            return eval_size(policy, ctx)
    return policy


def load(path):
    with open(path) as f:
        c = json.load(f)
    if "default" in c and "policy" not in c:  # a plain policy file: named by its file
        c = {"name": os.path.splitext(os.path.basename(path))[0], "method": c["default"].get("method", "hip"),
             "policy": c}
    for k in ["name", "method"]:
        if k not in c:
            raise ValueError(f"{path}: missing {k!r}")
    if c["method"] != "stock" and "policy" not in c:
        raise ValueError(f"{path}: missing 'policy'")
    c.setdefault("description", "")
    c["file"] = os.path.basename(path)
    return c


def load_dir(d):
    return {c["name"]: c for c in (load(os.path.join(d, f)) for f in sorted(os.listdir(d)) if f.endswith(".json"))}


def nominal_decode_fraction(policy, ctx):
    """Fraction of the context a sparse layer's decode step attends, from
    the config alone (hip: sink + window + last stage's keep; locret: budget
    + keep_last; lazy: the last point's keep; squeeze: 1 - quantile, what
    the calibration aims at). None when the config does not say."""
    p = policy.get("default", {})
    m = p.get("method")
    if m == "hip":
        n = p.get("sink", 0) + p.get("window", 0) + (p["stages"][-1]["keep_tokens"] if p.get("stages") else 0)
    elif m == "locret":
        n = p.get("budget", 0) + p.get("keep_last", 0)
    elif m == "lazy":
        return p["points"][-1]["keep"] if p.get("points") else None
    elif m == "squeeze":
        return 1.0 - p.get("quantile", 0.7)
    else:
        return None
    return min(1.0, n / ctx)
