"""Which dots XLA:GPU would turn into FP8 GEMMs: its GEMM rewriter's operand rules applied to HLO text.

XLA:GPU emits a cuBLASLt FP8 GEMM (``__cublas$lt$matmul$f8``) for one HLO shape only (openxla
``xla/service/gpu/transforms/gemm_rewriter.cc``: ``FindF8SubgraphRecursive``, ``MatchFp8Param``,
``CreateF8CustomCall``). Each dot operand must trace back to an FP8 value as

1. the FP8 value itself, or ``convert`` of it to a wider type,
2. optionally followed by a multiply or divide by a ``broadcast`` of a **scalar** (the scale),
3. then only ``bitcast`` (same element type), ``broadcast``, ``copy``, ``dynamic-slice``, ``pad``,
   ``reshape``, ``select`` (other branch a broadcast zero), ``slice`` or ``transpose``;

and the dot must have one contracting dimension per operand (operands of rank batch + 2), an
output of bf16 / f16 / f32 / e4m3fn / e5m2, and not two e5m2 operands (cuBLASLt refuses them).
The search for the FP8 value walks single-operand ops, ``divide`` / ``dynamic-slice`` / ``pad``
(first operand) and ``multiply`` / ``select`` (first matching value operand), as the rewriter does.

:func:`check_hlo` applies those rules to every dot **fed by FP8 values** -- a dot one of whose
operands is computed from an FP8 value without passing through another dot, following values
through calls, tuples and ``while`` loops (so a backward dot that reads a dequantized residual
from a scan's loop state counts, and is refused: no FP8 value is reachable for the rewriter).
The text is the *unoptimized* HLO of a lowered program (``jax.jit(f).lower(...).as_text(
dialect="hlo")``), lowered with the op set a GPU run gets; the checker first does what XLA's
early passes do to it (inlines ``call``, folds ``get-tuple-element(tuple)``, drops sharding
annotations) and nothing else. A dot skipped by the rewriter only for now (an operand that is a
rank-2 transpose, folded into the dot by a later pass) is judged by the rules above.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Optional

F8_TYPE = re.compile(r"\bf8e\w+")
CUBLAS_F8 = ("f8e4m3fn", "f8e5m2")            # cuBLASLt's FP8 operand types (CUDA)
OUT_TYPES = ("bf16", "f16", "f32", "f8e4m3fn", "f8e5m2")
# ops that commute with dequantization (MatchFp8Param's list)
COMMUTATIVE = ("bitcast", "broadcast", "copy", "dynamic-slice", "pad", "reshape", "select",
               "slice", "transpose")
_TRANSPARENT_CALLS = ("Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str                 # the type text, e.g. "f32[4,8]{1,0}" or "(f32[], s32[])"
    opcode: str
    operands: list[str]
    attrs: str
    root: bool = False
    literal: str = ""          # constant: its value text; parameter: its number

    @property
    def element_type(self) -> str:
        m = re.match(r"\(?\s*([a-z0-9]+)", self.shape)
        return m.group(1) if m else ""

    @property
    def dims(self) -> Optional[list[int]]:
        m = re.match(r"[a-z0-9]+\[([0-9,]*)\]", self.shape)
        if not m:
            return None
        return [int(d) for d in m.group(1).split(",") if d]

    def attr(self, key: str) -> Optional[str]:
        m = re.search(rf"\b{re.escape(key)}=(\{{[^}}]*\}}|[^,\s]+)", self.attrs)
        return m.group(1) if m else None

    def attr_ints(self, key: str) -> list[int]:
        v = self.attr(key)
        if not v:
            return []
        return [int(x) for x in re.findall(r"-?\d+", v)]


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced HLO text near: {text[start:start + 80]!r}")


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for c in text:
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        if c == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += c
    if cur.strip():
        out.append(cur)
    return [s.strip() for s in out]


_LINE = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")


def _parse_instr(line: str) -> Optional[Instr]:
    m = _LINE.match(line)
    if not m:
        return None
    i = m.end()
    if line[i] == "(":                      # tuple shape
        j = _balanced(line, i)
    else:
        j = line.index(" ", i)
    shape = line[i:j].strip()
    rest = line[j:].lstrip()
    k = rest.index("(")
    opcode = rest[:k].strip()
    end = _balanced(rest, k)
    operands = []
    for op in _split_top(rest[k + 1:end - 1]):
        # "f32[4,8]{1,0} %x" (older text) or "x" (newer): the name is the last token
        name = op.split()[-1].lstrip("%") if op else ""
        if name:
            operands.append(name)
    literal = ""
    if opcode in ("constant", "parameter"):     # a literal / the parameter number, no operand
        literal, operands = rest[k + 1:end - 1].strip(), []
    return Instr(m.group(2), shape, opcode, operands, rest[end:], bool(m.group(1)), literal)


def parse_hlo(text: str) -> tuple[dict[str, dict[str, Instr]], str]:
    """HLO text -> ({computation: {instruction: Instr}}, entry computation name)."""
    comps: dict[str, dict[str, Instr]] = {}
    entry, cur = "", None
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith(("HloModule", "//")):
            continue
        if cur is None:
            if s.endswith("{"):
                head = s[:-1].strip()
                is_entry = head.startswith("ENTRY")
                head = head.removeprefix("ENTRY").strip()
                cur = re.match(r"%?([\w.\-]+)", head).group(1)
                comps[cur] = {}
                if is_entry:
                    entry = cur
            continue
        if s == "}":
            cur = None
            continue
        ins = _parse_instr(s)
        if ins is not None:
            comps[cur][ins.name] = ins
    return comps, entry


# --------------------------------------------------------------------------------------------


Node = tuple  # (context: tuple of call-site (comp, name), computation, instruction name)


class _Module:
    """Parsed HLO with the inlined view XLA's early passes give (calls inlined, tuples folded)."""

    def __init__(self, text: str):
        self.comps, self.entry = parse_hlo(text)
        self.roots = {c: next((i for i in ins.values() if i.root), None)
                      for c, ins in self.comps.items()}
        # callers of each computation: call sites (inlined) and while bodies (kept)
        self.callers: dict[str, list[tuple[str, Instr]]] = {}
        for c, ins in self.comps.items():
            for i in ins.values():
                for key in ("to_apply", "body", "condition"):
                    callee = i.attr(key)
                    if callee and i.opcode in ("call", "while"):
                        self.callers.setdefault(callee.lstrip("%"), []).append((c, i))

    def instr(self, node: Node) -> Instr:
        return self.comps[node[1]][node[2]]

    def operand(self, node: Node, k: int) -> Node:
        return (node[0], node[1], self.instr(node).operands[k])

    def resolve(self, node: Node) -> Optional[Node]:
        """The node XLA sees once calls are inlined: a call is its callee's root, a callee's
        parameter the call site's operand, get-tuple-element of a tuple that operand, a sharding
        annotation its operand."""
        for _ in range(10_000):
            ins = self.instr(node)
            ctx, comp = node[0], node[1]
            if ins.opcode == "call":
                callee = ins.attr("to_apply").lstrip("%")
                node = (ctx + ((comp, ins.name),), callee, self.roots[callee].name)
            elif ins.opcode == "parameter":
                if not ctx:          # the entry's or a loop's: a value of its own
                    return node
                site_comp, site = ctx[-1]
                k = int(ins.literal)
                node = (ctx[:-1], site_comp, self.comps[site_comp][site].operands[k])
            elif ins.opcode == "custom-call" and any(
                    f'"{t}"' in ins.attrs for t in _TRANSPARENT_CALLS):
                node = self.operand(node, 0)
            elif ins.opcode == "get-tuple-element":
                src = self.resolve(self.operand(node, 0))
                if src is None or self.instr(src).opcode != "tuple":
                    return node
                node = (src[0], src[1], self.instr(src).operands[int(ins.attr("index"))])
            else:
                return node
        raise RuntimeError("HLO resolution did not terminate")

    def operands(self, node: Node) -> list[Optional[Node]]:
        return [self.resolve(self.operand(node, k)) for k in range(len(self.instr(node).operands))]

    # ---------------------------------------------------------------- every dot, inlined copies

    def dots(self) -> Iterator[Node]:
        """Every dot of the program after call inlining (one per call path); while bodies and
        other called computations are walked once each with an empty call context."""
        seen_roots: set = set()

        def walk(ctx, comp):
            for ins in self.comps[comp].values():
                if ins.opcode == "dot":
                    yield (ctx, comp, ins.name)
                elif ins.opcode == "call":
                    yield from walk(ctx + ((comp, ins.name),), ins.attr("to_apply").lstrip("%"))
                elif ins.opcode in ("while", "conditional"):
                    for key in ("body", "condition"):
                        callee = ins.attr(key)
                        if callee and callee.lstrip("%") not in seen_roots:
                            seen_roots.add(callee.lstrip("%"))
                            yield from walk((), callee.lstrip("%"))
                    for callee in re.findall(r"%?([\w.\-]+)", ins.attr("branch_computations")
                                             or ""):
                        if callee in self.comps and callee not in seen_roots:
                            seen_roots.add(callee)
                            yield from walk((), callee)

        yield from walk((), self.entry)

    # ---------------------------------------------------------------- FP8-fed (broad dataflow)

    def fed_by_f8(self, node: Node) -> bool:
        """Whether ``node``'s value is computed from an FP8 value without passing through a dot,
        following calls, tuples and while loops (by tuple index)."""
        seen: set = set()
        stack = [(node[1], node[2], ())]
        while stack:
            comp, name, path = stack.pop()
            if (comp, name, path) in seen:
                continue
            seen.add((comp, name, path))
            ins = self.comps[comp][name]
            if not path and F8_TYPE.match(ins.element_type or ""):
                return True
            op = ins.opcode
            if op in ("dot", "convolution", "constant", "iota", "rng", "rng-bit-generator"):
                continue
            if op == "get-tuple-element":
                stack.append((comp, ins.operands[0], (int(ins.attr("index")),) + path))
            elif op == "tuple":
                if path:
                    stack.append((comp, ins.operands[path[0]], path[1:]))
                else:
                    stack.extend((comp, o, ()) for o in ins.operands)
            elif op == "parameter":
                k = int(ins.literal)
                for caller_comp, site in self.callers.get(comp, []):
                    if site.opcode == "call":
                        stack.append((caller_comp, site.operands[k], path))
                    elif site.attr("body") and site.attr("body").lstrip("%") == comp:
                        stack.append((caller_comp, site.operands[0], path))
                        stack.append((comp, self.roots[comp].name, path))
            elif op == "call":
                callee = ins.attr("to_apply").lstrip("%")
                stack.append((callee, self.roots[callee].name, path))
            elif op == "while":
                body = ins.attr("body").lstrip("%")
                stack.append((body, self.roots[body].name, path))
                stack.append((comp, ins.operands[0], path))
            elif op == "opt-barrier":
                stack.append((comp, ins.operands[0], path))
            else:
                stack.extend((comp, o, ()) for o in ins.operands)
        return False


@dataclasses.dataclass
class DotVerdict:
    """One FP8-fed dot: whether the rewriter would make it an FP8 GEMM, and why not."""

    name: str
    computation: str
    accepted: bool
    reason: str                 # "" when accepted
    operand_types: tuple        # the FP8 types found per operand (None: none reachable)
    out_type: str


def _find_f8(mod: _Module, node: Node, seen: set) -> Optional[list[tuple[Node, int]]]:
    """FindF8SubgraphRecursive: the path [(f8 node, -1), ..., (node, operand index)] or None."""
    if node is None or node in seen:
        return None
    seen.add(node)
    ins = mod.instr(node)
    if F8_TYPE.match(ins.element_type):
        return [(node, -1)]
    ops = mod.operands(node)
    if len(ops) == 1 or ins.opcode in ("divide", "dynamic-slice", "pad"):
        sub = _find_f8(mod, ops[0], seen) if ops else None
        if sub is not None:
            sub.append((node, 0))
        return sub
    if ins.opcode in ("multiply", "select"):
        first = 1 if ins.opcode == "select" else 0
        for k in (first, first + 1):
            sub = _find_f8(mod, ops[k], seen)
            if sub is not None:
                sub.append((node, k))
                return sub
    return None


def _is_broadcast_zero(mod: _Module, node: Optional[Node]) -> bool:
    if node is None or mod.instr(node).opcode != "broadcast":
        return False
    c = mod.operands(node)[0]
    while c is not None and mod.instr(c).opcode == "convert":   # constant folding
        c = mod.operands(c)[0]
    if c is None:
        return False
    ci = mod.instr(c)
    m = re.match(r"\s*\(?\s*(-?[0-9.e+\-]+)", ci.literal)
    return ci.opcode == "constant" and m is not None and float(m.group(1)) == 0.0


def _broadcast_source(mod: _Module, node: Node) -> Optional[Node]:
    """What a broadcast broadcasts, as XLA's algebraic simplifier leaves it before the rewriter
    runs: chains of broadcast / reshape / bitcast of a one-element value become one broadcast
    of that (then scalar) value; otherwise the broadcast's operand."""
    first = mod.operands(node)[0]
    cur = first
    while cur is not None and mod.instr(cur).opcode in ("broadcast", "reshape", "bitcast"):
        dims = mod.instr(cur).dims
        if dims is not None and all(d == 1 for d in dims):
            return cur
        cur = mod.operands(cur)[0]
    if cur is not None and (mod.instr(cur).dims or []) and all(d == 1 for d in
                                                               mod.instr(cur).dims):
        return cur
    return first


def _match_param(mod: _Module, node: Optional[Node]):
    """MatchFp8Param: (f8 type, scale node or None, last commutative node or the f8 node) or an
    error string."""
    path = _find_f8(mod, node, set())
    if path is None:
        return "no FP8 value reachable through the ops the rewriter walks"
    f8 = path[0][0]
    f8_type = mod.instr(f8).element_type
    if len(path) == 1:
        return f8_type, None, f8
    scale = None
    n_deq = 0

    def is_convert_of_f8(n):
        return n is not None and mod.instr(n).opcode == "convert" and F8_TYPE.match(
            mod.instr(mod.operands(n)[0]).element_type if mod.operands(n)[0] else "")

    if len(path) > 2 and mod.instr(path[2][0]).opcode in ("multiply", "divide"):
        a, b = mod.operands(path[2][0])
        pairs = [(a, b), (b, a)] if mod.instr(path[2][0]).opcode == "multiply" else [(a, b)]
        for conv, bc in pairs:
            if is_convert_of_f8(conv) and bc is not None and mod.instr(bc).opcode == "broadcast":
                scale = _broadcast_source(mod, bc)
                n_deq = 2
                break
    if n_deq == 0 and len(path) > 1 and is_convert_of_f8(path[1][0]):
        n_deq = 1
    if n_deq == 0:
        kinds = " -> ".join(mod.instr(n).opcode for n, _ in path[1:4])
        return f"no dequantize (convert, then multiply/divide by a broadcast scalar): {kinds}"
    for n, k in path[1 + n_deq:]:
        ins = mod.instr(n)
        if ins.opcode not in COMMUTATIVE:
            return (f"{ins.opcode} between the dequantize and the dot (only "
                    f"{', '.join(COMMUTATIVE)} may be)")
        if ins.opcode == "bitcast" and ins.element_type != mod.instr(
                mod.operands(n)[0]).element_type:
            return "bitcast that changes the element type after the dequantize"
        if ins.opcode == "select" and not _is_broadcast_zero(mod, mod.operands(n)[2 if k == 1
                                                                                else 1]):
            return "select after the dequantize whose other branch is not a broadcast zero"
    sdims = mod.instr(scale).dims if scale is not None else []
    if sdims is None or any(d != 1 for d in sdims):
        return f"non-scalar scale {mod.instr(scale).shape}: the rewriter wants scalars"
    last = path[-1][0] if len(path) > 1 + n_deq else f8
    return f8_type, scale, last


def judge_dot(mod: _Module, node: Node) -> DotVerdict:
    """The rewriter's verdict on one dot (its FP8-dtype pass, CUDA rules)."""
    ins = mod.instr(node)
    ops = mod.operands(node)
    found = [_match_param(mod, op) for op in ops[:2]]
    types = tuple(f[0] if isinstance(f, tuple) else None for f in found)
    reason = ""
    for side, f in zip(("lhs", "rhs"), found):
        if isinstance(f, str):
            reason = f"{side}: {f}"
            break
    if not reason:
        lc, rc = ins.attr_ints("lhs_contracting_dims"), ins.attr_ints("rhs_contracting_dims")
        nb = len(ins.attr_ints("lhs_batch_dims"))
        if types[0] == "f8e5m2" and types[1] == "f8e5m2":
            reason = "e5m2 x e5m2 (cuBLASLt needs one e4m3fn operand)"
        elif any(t not in CUBLAS_F8 for t in types):
            reason = f"operand types {types}: cuBLASLt takes f8e4m3fn / f8e5m2"
        elif ins.element_type not in OUT_TYPES:
            reason = f"output type {ins.element_type}"
        elif len(lc) != 1 or len(rc) != 1:
            reason = f"{len(lc)} x {len(rc)} contracting dimensions (one each)"
        else:
            for f in found:
                dims = mod.instr(f[2]).dims
                if dims is None or len(dims) != nb + 2:
                    reason = ("an operand without exactly one contracting and one "
                              "non-contracting dimension")
    return DotVerdict(ins.name, node[1], not reason, reason, types, ins.element_type)


@dataclasses.dataclass
class Report:
    """:func:`check_hlo`'s answer: the verdict on every FP8-fed dot."""

    dots: list[DotVerdict]

    @property
    def accepted(self) -> int:
        return sum(d.accepted for d in self.dots)

    @property
    def total(self) -> int:
        return len(self.dots)

    @property
    def all_accepted(self) -> bool:
        return bool(self.dots) and self.accepted == self.total

    def summary(self) -> str:
        lines = [f"{self.accepted} of {self.total} FP8-fed dots take the FP8 GEMM form"]
        reasons: dict[str, int] = {}
        for d in self.dots:
            if not d.accepted:
                reasons[d.reason] = reasons.get(d.reason, 0) + 1
        lines += [f"  {n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)


def check_hlo(text: str) -> Report:
    """Every dot of ``text`` (unoptimized HLO) fed by FP8 values, judged by the rewriter's rules
    (module doc)."""
    mod = _Module(text)
    out = []
    for node in mod.dots():
        ins = mod.instr(node)
        if not any(mod.fed_by_f8((node[0], node[1], o)) for o in ins.operands[:2]):
            continue
        out.append(judge_dot(mod, node))
    return Report(out)


# --------------------------------------------------------------------------------------------
# Counting the GEMMs of a compiled (optimized) program, per projection


FP8_GEMM_TARGETS = ("__cublas$lt$matmul$f8",)
PLAIN_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul")
_GEMM_FUSION_KINDS = ("__triton_gemm", "__cudnn$fusion", "__triton_nested_gemm_fusion")
_WRAPPERS = {"while", "body", "cond", "checkpoint", "rematted_computation", "remat", "scan",
             "closed_call"}


def projection_of(op_name: str) -> Optional[str]:
    """The quantized projection an op belongs to, from its metadata ``op_name`` (the FP8 dot is
    the sub-module ``fp8`` of its projection): ``jit(step)/transpose(jvp(TransformerLM))/
    layers_0/attn/q_proj/fp8/dot_general`` -> ``layers_0/attn/q_proj``; None outside one."""
    if "/fp8/" not in op_name:
        return None
    head = op_name.split("/fp8/")[0]
    parts = [p for p in head.split("/") if p and "(" not in p and ")" not in p
             and p not in _WRAPPERS]
    return "/".join(parts) or None


def _calls_dot(comps: dict, ins: Instr) -> bool:
    callee = (ins.attr("calls") or "").lstrip("%")
    return any(i.opcode == "dot" for i in comps.get(callee, {}).values())


def gemm_counts(compiled_text: str) -> dict[str, dict[str, int]]:
    """{projection (or ``"other"``): {"fp8": n, "plain": n}}: the GEMMs of a compiled program --
    cuBLASLt FP8 custom calls and Triton / cuDNN GEMM fusions with FP8 operands count as FP8;
    other cuBLAS GEMM calls, GEMM fusions and dots left in the program count as plain. Ops inside
    fused computations are not counted again (their fusion is)."""
    comps, _ = parse_hlo(compiled_text)
    fused = set()
    for ins_map in comps.values():
        for ins in ins_map.values():
            if ins.opcode == "fusion":
                callee = ins.attr("calls")
                if callee:
                    fused.add(callee.lstrip("%"))
    out: dict[str, dict[str, int]] = {}
    for comp, ins_map in comps.items():
        if comp in fused:
            continue
        for ins in ins_map.values():
            kind = None
            target = ins.attr("custom_call_target") or ""
            target = target.strip('"')
            if ins.opcode == "custom-call" and target in FP8_GEMM_TARGETS:
                kind = "fp8"
            elif ins.opcode == "custom-call" and target in PLAIN_GEMM_TARGETS:
                kind = "plain"
            elif ins.opcode == "fusion" and any(k in ins.attrs for k in _GEMM_FUSION_KINDS):
                types = [ins_map[o].element_type for o in ins.operands if o in ins_map]
                kind = "fp8" if any(F8_TYPE.match(t) for t in types) else "plain"
            elif ins.opcode == "fusion" and _calls_dot(comps, ins):
                kind = "plain"          # e.g. XLA:CPU's GEMM fusions (on upcast operands)
            elif ins.opcode == "dot":
                kind = "plain"
            if kind is None:
                continue
            m = re.search(r'op_name="([^"]*)"', ins.attrs)
            proj = projection_of(m.group(1)) if m else None
            row = out.setdefault(proj or "other", {"fp8": 0, "plain": 0})
            row[kind] += 1
    return out


def fp8_gemm_verdict(counts: dict[str, dict[str, int]], min_per_projection: int = 3
                     ) -> tuple[bool, list[str]]:
    """(every quantized projection runs >= ``min_per_projection`` FP8 GEMMs and no plain GEMM,
    the projections that do not). False with no projection at all."""
    projs = {p: c for p, c in counts.items() if p != "other"}
    bad = sorted(p for p, c in projs.items() if c["fp8"] < min_per_projection or c["plain"])
    return bool(projs) and not bad, bad
