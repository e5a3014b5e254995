#!/usr/bin/env python3
"""Machine-code report of fastdropout's CUDA kernels, read from the built extension (no GPU).

    python scripts/sass_report.py                      # the installed/in-place fastdropout/_C*.so
    python scripts/sass_report.py path/to/_C.so --arch sm_90 --json report.json

For every kernel instantiation in every SASS architecture embedded in the extension it prints:
registers, stack frame and local memory (and LDL/STL instructions: spills), 16-byte global loads
and stores (LDG/STG .128, and the 256-bit forms of newer chips), narrower data accesses, call
sites of division subroutines and inline integer divisions, the Philox multiplies and how many
of them come before the first data load (0: the loads are issued first, so memory and arithmetic
overlap), whether the (seed, offset) state is loaded before the data, and how many Philox key
schedule additions run per thread rather than in uniform registers. It also lists the embedded
cubins and PTX.

It exits non-zero (1) when any kernel uses local memory (spills, a stack frame, LDL/STL), or when
a plain or fused vector kernel has no 16-byte load or no 16-byte store. Each instantiation is
checked on its own: counting over the whole file would hide a kernel that has none. Exit code 2:
nothing to report (no cuobjdump, no extension, or no CUDA kernels in it).

Which kernels are vector kernels comes from the names and the CUDA sources: a kernel's template
parameters are read from its definition under csrc/ (`template <typename scalar_t, bool kVector>
__global__ void ..._cuda_kernel(`). A bool parameter named for vector/aligned access (kVector,
kAligned) or an int count of columns/elements per thread (kCols, kVecSize: more than 1) decides
for its instantiation, in any family. Without one, a kernel of the plain or fused family must
have a vector body (item 10 of issue 9: vector body with separate head and tail), unless its
name says scalar/unaligned/head/tail, or transposed/permuted/strided (a layout kernel). Families are told by name: `bias_dropout_add` (fused),
`bias_grad`/`reduce` (fused-reduce), `channel`, `mask`, other `dropout` kernels (plain).

cuobjdump is looked for in $CUOBJDUMP, on PATH, in $CUDA_HOME/bin, $CUDA_PATH/bin, next to the
real nvcc, in /usr/local/cuda/bin, in the nvidia-cuda-cuobjdump wheel and in Triton's wheel.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Philox4x32 round multipliers, as cuobjdump prints them (it shows immediates >= 2^31 negated).
PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
# The key schedule adds k * (0x9E3779B9, 0xBB67AE85) for k = 1..9 (rounds 2 to 10).
PHILOX_KEY_STEPS = tuple((k * w) % 2**32 for k in range(1, 10) for w in (0x9E3779B9, 0xBB67AE85))

DTYPE_SHORT = {"float": "fp32", "double": "fp64", "c10::BFloat16": "bf16", "c10::Half": "fp16",
               "at::BFloat16": "bf16", "at::Half": "fp16", "__nv_bfloat16": "bf16", "__half": "fp16"}


def _immediate_forms(value: int) -> Tuple[str, ...]:
    """The ways cuobjdump writes a 32-bit immediate: 0x... and, for values >= 2^31, -0x..."""
    forms = [hex(value)]
    if value >= 2**31:
        forms.append("-" + hex(2**32 - value))
    return tuple(forms)


def _immediate_pattern(values: Iterable[int]) -> "re.Pattern[str]":
    forms = sorted({f for v in values for f in _immediate_forms(v)}, key=len, reverse=True)
    return re.compile(r"(?<![0-9a-fA-Fx])(" + "|".join(re.escape(f) for f in forms) + r")(?![0-9a-fA-F])")


PHILOX_MUL_RE = _immediate_pattern(PHILOX_MULTIPLIERS)
PHILOX_KEY_RE = _immediate_pattern(PHILOX_KEY_STEPS)


# ---------------------------------------------------------------------------------------------
# Finding the tools and the extension


def _site_packages() -> List[str]:
    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    dirs.update(p for p in sys.path if p.endswith("site-packages"))
    return sorted(d for d in dirs if os.path.isdir(d))


def _nvcc_toolkit_bin() -> Optional[str]:
    """The bin/ of the toolkit behind the nvcc on PATH (nvcc may be a wrapper script)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        err = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        err = ""
    m = re.search(r"^#\$ TOP=(.+)$", err, re.MULTILINE)
    if m:
        return os.path.join(m.group(1).strip(), "bin")
    return os.path.dirname(os.path.realpath(nvcc))


def find_cuobjdump() -> Optional[str]:
    """Path of a usable cuobjdump, or None. Example: find_cuobjdump() -> '/usr/local/cuda/bin/cuobjdump'."""
    candidates: List[Optional[str]] = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    toolkit_bin = _nvcc_toolkit_bin()
    if toolkit_bin:
        candidates.append(os.path.join(toolkit_bin, "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    for site in _site_packages():
        candidates += sorted(glob.glob(os.path.join(site, "nvidia", "*", "bin", "cuobjdump")))
        candidates.append(os.path.join(site, "triton", "backends", "nvidia", "bin", "cuobjdump"))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def find_extension() -> Optional[str]:
    """The fastdropout._C shared library: the importable package's, else this checkout's."""
    dirs = []
    try:
        spec = importlib.util.find_spec("fastdropout")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        dirs += list(spec.submodule_search_locations)
    dirs.append(os.path.join(REPO, "fastdropout"))
    for d in dirs:
        found = sorted(glob.glob(os.path.join(d, "_C*.so")) + glob.glob(os.path.join(d, "_C*.pyd")))
        if found:
            return found[0]
    return None


def _run(tool: str, *args: str) -> str:
    proc = subprocess.run([tool, *args], capture_output=True, text=True)
    if proc.returncode != 0 and not proc.stdout:
        raise RuntimeError(f"{os.path.basename(tool)} {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def list_embedded(tool: str, so: str) -> Tuple[List[str], List[str]]:
    """(cubin names, PTX names) that cuobjdump -lelf / -lptx list, e.g. 'dropout_cuda.sm_90.cubin'."""
    def names(flag):
        out = _run(tool, flag, so)
        return [m.group(1).strip() for m in re.finditer(r"^(?:ELF|PTX) file\s+\d+:\s*(\S+)", out, re.MULTILINE)]
    return names("-lelf"), names("-lptx")


def archs_of(names: Sequence[str]) -> List[str]:
    found = {m.group(1) for n in names for m in [re.search(r"\.(sm_\d+[a-z]?)\.", n)] if m}
    return sorted(found, key=lambda a: (int(re.sub(r"\D", "", a)), a))


# ---------------------------------------------------------------------------------------------
# Names: demangling, template arguments, the kernels' template parameters in the sources


def demangle_all(names: Sequence[str]) -> Dict[str, str]:
    """Mangled -> demangled, through c++filt when present, else the small parser below."""
    result = {}
    cxxfilt = shutil.which("c++filt") or shutil.which("llvm-cxxfilt")
    if cxxfilt and names:
        try:
            out = subprocess.run([cxxfilt], input="\n".join(names) + "\n", capture_output=True,
                                 text=True, timeout=60).stdout.splitlines()
            if len(out) == len(names):
                result = dict(zip(names, out))
        except (OSError, subprocess.SubprocessError):
            pass
    for n in names:
        if n not in result or result[n] == n:
            result[n] = _MiniDemangler(n).function_name() or n
    return result


class _MiniDemangler:
    """Just enough of the Itanium C++ ABI for kernel names: nested names, the anonymous
    namespace, template arguments of builtin, class and literal (bool/int/enum) kinds. Returns
    'ns::name<args>' without the parameter list, or None where the name is outside that subset."""

    BUILTIN = {"v": "void", "b": "bool", "c": "char", "a": "signed char", "h": "unsigned char",
               "s": "short", "t": "unsigned short", "i": "int", "j": "unsigned int", "l": "long",
               "m": "unsigned long", "x": "long long", "y": "unsigned long long", "f": "float",
               "d": "double"}

    def __init__(self, s: str):
        self.s, self.i = s, 0

    def function_name(self) -> Optional[str]:
        try:
            if not self.s.startswith("_Z"):
                return None
            self.i = 2
            return self._name()
        except (IndexError, ValueError, AttributeError):
            return None

    def _peek(self) -> str:
        return self.s[self.i]

    def _source_name(self) -> str:
        m = re.match(r"\d+", self.s[self.i:])
        n = int(m.group(0))
        self.i += len(m.group(0))
        name = self.s[self.i:self.i + n]
        self.i += n
        return "(anonymous namespace)" if name.startswith("_GLOBAL__N") else name

    def _name(self) -> str:
        if self._peek() == "N":
            self.i += 1
            parts = []
            while self._peek() != "E":
                if self._peek() == "I":
                    parts[-1] += self._template_args()
                else:
                    parts.append(self._source_name())
            self.i += 1
            return "::".join(parts)
        name = self._source_name()
        if self.i < len(self.s) and self._peek() == "I":
            name += self._template_args()
        return name

    def _template_args(self) -> str:
        self.i += 1  # 'I'
        args = []
        while self._peek() != "E":
            args.append(self._arg())
        self.i += 1
        return "<" + ", ".join(args) + ">"

    def _arg(self) -> str:
        c = self._peek()
        if c == "L":
            self.i += 1
            kind = self._type()
            m = re.match(r"n?\d+", self.s[self.i:])
            value = m.group(0).replace("n", "-")
            self.i += len(m.group(0)) + 1  # value and 'E'
            if kind == "bool":
                return "true" if value == "1" else "false"
            return value if kind == "int" else f"({kind}){value}"
        return self._type()

    def _type(self) -> str:
        c = self._peek()
        if c in self.BUILTIN:
            self.i += 1
            return self.BUILTIN[c]
        if c == "N" or c.isdigit():
            return self._name()
        raise ValueError(f"unsupported mangling at {self.s[self.i:]}")


def split_template(demangled: str) -> Tuple[str, List[str]]:
    """'ns::(anonymous namespace)::k<c10::Half, true>(args)' -> ('k', ['c10::Half', 'true'])."""
    # Drop a leading return type ('void ') and the parameter list: the name ends at the first
    # '(' at template depth 0 that is not part of '(anonymous namespace)'.
    text = demangled.replace("(anonymous namespace)", "{anon}")
    if text.startswith("void "):
        text = text[5:]
    depth, end = 0, len(text)
    for k, ch in enumerate(text):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            end = k
            break
    qualified = text[:end]
    lt = qualified.find("<")
    base = qualified if lt < 0 else qualified[:lt]
    base = base.split("::")[-1]
    args: List[str] = []
    if lt >= 0:
        inner = qualified[lt + 1:qualified.rfind(">")]
        depth, cur = 0, ""
        for ch in inner:
            if ch in "<(":
                depth += 1
            elif ch in ">)":
                depth -= 1
            if ch == "," and depth == 0:
                args.append(cur.strip())
                cur = ""
            else:
                cur += ch
        if cur.strip():
            args.append(cur.strip())
    return base, args


def kernel_template_params(source_dir: str) -> Dict[str, List[Tuple[str, str]]]:
    """Kernel name -> [(kind, name)] of its template parameters, read from the __global__
    definitions under source_dir, e.g. {'dropout_cuda_kernel': [('typename', 'scalar_t'),
    ('bool', 'kAligned')]}. Kernels that are not templates map to []."""
    params: Dict[str, List[Tuple[str, str]]] = {}
    files = []
    for ext in ("cu", "cuh", "h", "hpp"):
        files += glob.glob(os.path.join(source_dir, "**", f"*.{ext}"), recursive=True)
    kernel_re = re.compile(r"__global__\s+(?:(?:void|__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\))\s+)*(\w+)\s*\(")
    for path in sorted(files):
        with open(path, errors="replace") as f:
            text = re.sub(r"//[^\n]*|/\*.*?\*/", "", f.read(), flags=re.DOTALL)
        for m in kernel_re.finditer(text):
            name = m.group(1)
            # The template header belongs to this declaration if nothing but attributes lie
            # between its closing '>' and __global__ (no ';' or '}').
            head = text[:m.start()]
            t = head.rfind("template")
            plist: List[Tuple[str, str]] = []
            if t >= 0 and not re.search(r"[;{}]", head[t:]):
                inner = _angle_contents(head, head.find("<", t))
                for p in _split_top(inner):
                    p = p.split("=")[0].strip()
                    words = re.findall(r"[\w:]+", p)
                    if len(words) >= 2:
                        plist.append((" ".join(words[:-1]), words[-1]))
            params.setdefault(name, plist)
    return params


def _angle_contents(text: str, start: int) -> str:
    depth = 0
    for k in range(start, len(text)):
        if text[k] == "<":
            depth += 1
        elif text[k] == ">":
            depth -= 1
            if depth == 0:
                return text[start + 1:k]
    return text[start + 1:]


def _split_top(s: str) -> List[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "<(["
        depth -= ch in ">)]"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


VECTOR_PARAM_RE = re.compile(r"vec|aligned", re.IGNORECASE)
WIDTH_PARAM_RE = re.compile(r"cols|columns|vec|width|pack|elems|per_thread", re.IGNORECASE)
INT_KINDS = ("int", "unsigned", "unsigned int", "int64_t", "uint32_t", "size_t", "long")
SCALAR_PARAM_RE = re.compile(r"scalar(?!_t)|unaligned|misaligned", re.IGNORECASE)


def family_of(kernel: str) -> str:
    """plain | fused | fused-reduce | channel | mask | other, from the kernel's name."""
    k = kernel.lower()
    if "bias_dropout_add" in k or "fused" in k:
        return "fused-reduce" if re.search(r"reduce|bias_grad|grad_bias", k) else "fused"
    if re.search(r"reduce|bias_grad|grad_bias", k):
        return "fused-reduce"
    if "channel" in k or "feature" in k:
        return "channel"
    if "mask" in k:
        return "mask"
    if "dropout" in k:
        return "plain"
    return "other"


def vector_expectation(kernel: str, args: Sequence[str], params: Optional[List[Tuple[str, str]]]) -> Tuple[bool, str]:
    """(must have 16-byte loads and stores, why). A kernel whose template parameters say
    vector (see _vector_by_params) must, whatever its family; a plain or fused kernel with no
    such parameter must too (a vector body with head and tail), unless its name says
    scalar/unaligned/head/tail."""
    family = family_of(kernel)
    if re.search(r"scalar|unaligned|misaligned|head|tail|edge", kernel, re.IGNORECASE):
        return False, "scalar by name"
    if re.search(r"transpos|permut|strided|gather|scatter", kernel, re.IGNORECASE):
        return False, "layout kernel by name (its accesses follow the layout)"
    if params is None:
        if family not in ("plain", "fused"):
            return False, family
        return True, "vector (no source found for this kernel: assumed vector)"
    decided = _vector_by_params(args, params)
    if decided is not None:
        return decided
    if family not in ("plain", "fused"):
        return False, family
    return True, "vector body expected"


def _vector_by_params(args: Sequence[str], params: List[Tuple[str, str]]) -> Optional[Tuple[bool, str]]:
    """A template parameter that says vector or scalar: a bool named for vector/aligned access
    (kVector, kAligned), or an int count of elements or columns per thread (kCols, kVecSize,
    kWidth: more than 1 is vector)."""
    for (kind, pname), value in zip(params, args):
        if kind == "bool" and SCALAR_PARAM_RE.search(pname):
            return (value != "true"), f"{pname}={value}"
        if kind == "bool" and VECTOR_PARAM_RE.search(pname):
            return (value == "true"), f"{pname}={value}"
        if kind in INT_KINDS and WIDTH_PARAM_RE.search(pname) and re.fullmatch(r"\(?[\w: ]*\)?\d+u?l*", value):
            return int(re.search(r"\d+", value.split(")")[-1]).group(0)) > 1, f"{pname}={value}"
    return None


def short_args(args: Sequence[str], params: Optional[List[Tuple[str, str]]]) -> str:
    """'<bf16, kAligned=true>' from ['c10::BFloat16', 'true'] and the parameter names."""
    out = []
    for k, a in enumerate(args):
        a = DTYPE_SHORT.get(a, a)
        if params and k < len(params) and params[k][0] != "typename" and params[k][0] != "class":
            a = f"{params[k][1]}={a}"
        out.append(a)
    return "<" + ", ".join(out) + ">" if out else ""


# ---------------------------------------------------------------------------------------------
# SASS parsing and per-kernel analysis


@dataclass
class Instr:
    addr: int
    guard: str      # '' or e.g. '@!P0'
    opcode: str
    operands: List[str]


@dataclass
class KernelReport:
    arch: str
    cubin: str
    mangled: str
    kernel: str
    family: str
    args: str
    regs: Optional[int] = None
    stack: Optional[int] = None
    shared: Optional[int] = None
    local: Optional[int] = None
    local_instrs: int = 0       # LDL/STL (spill traffic or local arrays)
    ld16: int = 0               # 16-byte (or wider) data loads
    st16: int = 0
    ld_narrow: int = 0          # data loads/stores narrower than 16 bytes
    st_narrow: int = 0
    rng_loads: int = 0          # thread-independent global loads (the saved seed/offset)
    div_calls: int = 0          # call sites of division/remainder subroutines
    other_calls: int = 0
    inline_divs: int = 0        # integer divisions expanded inline (I2F.RP + MUFU.RCP)
    philox_muls: int = 0
    muls_before_load: Optional[int] = None   # Philox multiplies before the first (16-byte) data load
    rng_before_data: Optional[bool] = None   # a seed/offset load can run before that data load
    key_adds_thread: int = 0    # key-schedule additions in per-thread registers
    key_adds_uniform: int = 0   # ... in uniform registers
    instructions: int = 0       # static count, subroutines and NOPs excluded
    needs_vector: bool = False
    why: str = ""
    failures: List[str] = field(default_factory=list)


INSTR_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
REG_RE = re.compile(r"\b(U?R\d+|U?P\d+)(\.64|\.128)?\b")
SPECIAL_THREAD_RE = re.compile(r"SR_(TID|LANEID|CTAID|VIRTUALSMID|SMID)")
NO_DEST = re.compile(r"^(ST|STG|STL|STS|RED|BRA|BRX|JMP|EXIT|RET|CALL|BAR|MEMBAR|FENCE|NOP|WARPSYNC|BSYNC|BSSY|DEPBAR|ERRBAR|CCTL|YIELD|BPT|KILL)")


def _split_operands(text: str) -> List[str]:
    return [o.strip() for o in _split_top(text) if o.strip()]


def _function_blocks(text: str, function_re: str) -> List[Tuple[str, str, List[str]]]:
    """[(cubin identifier, function name, the lines that follow up to the next function)] of a
    cuobjdump listing; function_re matches a function's header line, group 1 its name."""
    blocks: List[Tuple[str, str, List[str]]] = []
    identifier = ""
    for line in text.splitlines():
        m = re.match(r"\s*identifier\s*=\s*(.+)", line)
        if m:
            identifier = m.group(1).strip()
            continue
        m = re.match(function_re, line)
        if m:
            blocks.append((identifier, m.group(1), []))
        elif blocks:
            blocks[-1][2].append(line)
    return blocks


def parse_sass(text: str) -> List[Tuple[str, str, List[Instr]]]:
    """[(cubin identifier, mangled function name, instructions)] from cuobjdump -sass output."""
    functions = []
    for identifier, name, lines in _function_blocks(text, r"\s*Function\s*:\s*(\S+)"):
        instrs = [Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), _split_operands(m.group(4)))
                  for m in map(INSTR_RE.match, lines) if m]
        functions.append((identifier, name, instrs))
    return functions


def parse_resource_usage(text: str) -> Dict[Tuple[str, str], Dict[str, int]]:
    """(cubin identifier, mangled name) -> {'REG': .., 'STACK': .., 'SHARED': .., 'LOCAL': ..}."""
    usage: Dict[Tuple[str, str], Dict[str, int]] = {}
    for identifier, name, lines in _function_blocks(text, r"\s*Function\s+(\S+?):\s*$"):
        figures = next((line for line in lines if "REG:" in line), "")
        usage[(identifier, name)] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", figures)}
    return usage


def _regs(operand: str) -> List[str]:
    """Registers an operand names, register pairs/quads expanded (R4.64 -> R4, R5)."""
    out = []
    for m in REG_RE.finditer(operand):
        name, width = m.group(1), m.group(2)
        out.append(name)
        if width and name[0] in "RU" and "P" not in name:
            prefix = "UR" if name.startswith("UR") else "R"
            n = int(name[len(prefix):])
            out += [f"{prefix}{n + k}" for k in range(1, (2 if width == ".64" else 4))]
    return [r for r in out if r not in ("RZ", "URZ", "PT", "UPT")]


def _dest_operand_count(ins: Instr) -> int:
    """How many leading operands are written: the first, and a predicate (carry/compare) after it."""
    if NO_DEST.match(ins.opcode) or not ins.operands:
        return 0
    return 2 if len(ins.operands) > 1 and re.fullmatch(r"U?P\d", ins.operands[1]) else 1


def _dest_regs(ins: Instr) -> List[str]:
    if _dest_operand_count(ins) == 0:
        return []
    first = ins.operands[0]
    dests = _regs(first)
    if dests and first.startswith(("R", "UR")) and "." not in first:
        width = 4 if ".128" in ins.opcode else 2 if (".64" in ins.opcode or ".WIDE" in ins.opcode) else 1
        prefix = "UR" if dests[0].startswith("UR") else "R"
        n = int(dests[0][len(prefix):])
        dests = [f"{prefix}{n + k}" for k in range(width)]
    if len(ins.operands) > 1 and re.fullmatch(r"U?P\d", ins.operands[1]):
        dests.append(ins.operands[1])
    return dests


def _address_regs(operand: str) -> List[str]:
    """Registers of the address part of a memory operand 'desc[UR4][R4.64+0x8]' or '[R2.64]'."""
    groups = re.findall(r"\[([^\]]*)\]", operand)
    return _regs(groups[-1]) if groups else []


def _is_mem(opcode: str, kinds: Tuple[str, ...]) -> bool:
    return opcode.split(".")[0] in kinds


def _is_wide(opcode: str) -> bool:
    return bool(re.search(r"\.(128|256)\b|ENL2", opcode))


def subroutines(instrs: List[Instr]) -> Dict[int, Tuple[int, int]]:
    """Call target address -> (first, last) instruction index of the subroutine (up to its RET).
    Not every CALL enters a subroutine: ptxas also leaves a divergent loop by a CALL.REL.NOINC
    to its reconvergence point (a BSYNC in the kernel's own body). A target is a subroutine
    only if a RET follows it with no EXIT in between (the kernel's body ends in EXITs)."""
    index = {ins.addr: k for k, ins in enumerate(instrs)}
    result = {}
    for ins in instrs:
        if ins.opcode.startswith("CALL") and ins.operands:
            m = re.search(r"0x[0-9a-f]+", ins.operands[-1])
            if m and int(m.group(0), 16) in index:
                start = index[int(m.group(0), 16)]
                end = next((k for k in range(start, len(instrs))
                            if instrs[k].opcode.startswith(("RET", "EXIT"))), None)
                if end is not None and instrs[end].opcode.startswith("RET"):
                    result[int(m.group(0), 16)] = (start, end)
    return result


def _branch_target(ins: Instr) -> Optional[int]:
    m = re.search(r"0x[0-9a-f]+", ins.operands[-1]) if ins.operands else None
    return int(m.group(0), 16) if m else None


def _conditional(ins: Instr) -> bool:
    """Whether execution may also fall through: anything but a plain `BRA 0x...` / `EXIT`
    (guarded, on a predicate operand as in `BRA.U !UP0, 0x...`, or a variant like BRA.DIV).
    Erring towards 'may' only adds edges, which the may-analysis tolerates."""
    plain = ins.opcode in ("BRA", "JMP", "EXIT", "RET", "RET.REL.NODEC", "RET.ABS.NODEC")
    return bool(ins.guard) or not plain or (ins.opcode in ("BRA", "JMP") and len(ins.operands) > 1)


def basic_blocks(instrs: List[Instr]) -> Tuple[Dict[int, int], Dict[int, List[int]]]:
    """(block start -> end, block start -> successor block starts); blocks by instruction index.
    A CALL goes to its target and on after it (a subroutine returns; a CALL.REL.NOINC that
    leaves a loop is reached only that way, so its target must be a successor)."""
    index = {ins.addr: k for k, ins in enumerate(instrs)}
    enders = ("BRA", "JMP", "BRX", "JMX", "EXIT", "RET", "CALL")
    leaders = {0}
    for k, ins in enumerate(instrs):
        base = ins.opcode.split(".")[0]
        if base in enders:
            leaders.add(k + 1)
            target = _branch_target(ins) if base in ("BRA", "JMP", "CALL") else None
            if target in index:
                leaders.add(index[target])
    starts = sorted(k for k in leaders if k < len(instrs))
    bounds = {a: (starts[i + 1] if i + 1 < len(starts) else len(instrs)) for i, a in enumerate(starts)}
    succ: Dict[int, List[int]] = {}
    for a, b in bounds.items():
        last = instrs[b - 1]
        base = last.opcode.split(".")[0]
        nxt = [b] if b < len(instrs) else []
        if base in ("BRA", "JMP"):
            target = _branch_target(last)
            succ[a] = ([index[target]] if target in index else []) + (nxt if _conditional(last) else [])
        elif base == "CALL":
            target = _branch_target(last)
            succ[a] = ([index[target]] if target in index else []) + nxt
        elif base in ("EXIT", "RET"):
            succ[a] = nxt if _conditional(last) else []
        else:
            succ[a] = nxt
    return bounds, succ


def reaches(bounds: Dict[int, int], succ: Dict[int, List[int]], src: int, dst: int) -> bool:
    """Whether instruction dst can execute after instruction src (indices)."""
    block_of = {k: a for a, b in bounds.items() for k in range(a, b)}
    if block_of[src] == block_of[dst] and src < dst:
        return True
    seen, todo = set(), list(succ[block_of[src]])
    while todo:
        a = todo.pop()
        if a == block_of[dst]:
            return True
        if a not in seen:
            seen.add(a)
            todo += succ[a]
    return False


def thread_taint(instrs: List[Instr], subs: Dict[int, Tuple[int, int]]) -> List[set]:
    """For each instruction, the registers that may hold a thread-dependent value (one derived
    from the thread or block index) just before it: a forward may-analysis over the basic
    blocks, the union at joins. A global access whose address is thread-dependent is a data
    access; one whose address does not is a load of state shared by all threads (seed, offset)."""
    bounds, succ = basic_blocks(instrs)
    starts = sorted(bounds)
    sub_dests = {t: {d for i in instrs[x:y + 1] for d in _dest_regs(i)} for t, (x, y) in subs.items()}
    # Per instruction, once: (registers written, registers read, reads a thread/block index,
    # unconditional, a call's subroutine results or None).
    effects = []
    for ins in instrs:
        reads = {r for o in ins.operands[_dest_operand_count(ins):] for r in _regs(o)}
        if ins.guard:
            reads.update(_regs(ins.guard.lstrip("@!")))
        if _is_mem(ins.opcode, ("LDG", "LD")) and ins.operands:
            reads.update(_address_regs(ins.operands[-1]))
        special = bool(SPECIAL_THREAD_RE.search(", ".join(ins.operands)))
        called = sub_dests.get(_branch_target(ins), set()) if ins.opcode.startswith("CALL") else None
        effects.append((_dest_regs(ins), reads, special, not ins.guard, called))

    def transfer(k: int, tainted: set) -> None:
        writes, reads, special, unconditional, called = effects[k]
        if called is not None:
            tainted |= called  # the subroutine's results: assumed thread-dependent
            return
        if special or not reads.isdisjoint(tainted):
            tainted.update(writes)
        elif unconditional:
            tainted.difference_update(writes)

    block_in: Dict[int, set] = {a: set() for a in bounds}
    work = list(starts)
    while work:
        a = work.pop(0)
        state = set(block_in[a])
        for k in range(a, bounds[a]):
            transfer(k, state)
        for s in succ[a]:
            if not state <= block_in[s]:
                block_in[s] |= state
                if s not in work:
                    work.append(s)
    before: List[set] = [set()] * len(instrs)
    for a in starts:
        state = set(block_in[a])
        for k in range(a, bounds[a]):
            before[k] = set(state)
            transfer(k, state)
    return before


def analyse(arch: str, cubin: str, mangled: str, instrs: List[Instr], usage: Dict[str, int],
            demangled: str, params_by_kernel: Dict[str, List[Tuple[str, str]]]) -> KernelReport:
    kernel, args = split_template(demangled)
    params = params_by_kernel.get(kernel)
    rep = KernelReport(arch=arch, cubin=os.path.basename(cubin), mangled=mangled, kernel=kernel,
                       family=family_of(kernel), args=short_args(args, params))
    rep.regs, rep.stack = usage.get("REG"), usage.get("STACK")
    rep.shared, rep.local = usage.get("SHARED"), usage.get("LOCAL")
    rep.needs_vector, rep.why = vector_expectation(kernel, args, params)

    subs = subroutines(instrs)
    in_sub = set()
    division_targets = set()
    for target, (a, b) in subs.items():
        in_sub.update(range(a, b + 1))
        body = instrs[a:b + 1]
        if any(i.opcode.startswith("MUFU.RCP") for i in body):
            division_targets.add(target)

    taint_before = thread_taint(instrs, subs)
    first_load_k: Optional[int] = None
    first_wide_load_k: Optional[int] = None
    rng_loads_at: List[int] = []
    first_load_at = first_wide_load_at = None
    philox_seen = 0
    for k, ins in enumerate(instrs):
        op = ins.opcode
        if _is_mem(op, ("LDL", "STL")):
            rep.local_instrs += 1
        if op.startswith("CALL"):
            m = re.search(r"0x[0-9a-f]+", ins.operands[-1]) if ins.operands else None
            name = " ".join(ins.operands)
            if (m and int(m.group(0), 16) in division_targets) or re.search(r"div|rem", name):
                rep.div_calls += 1
            else:
                rep.other_calls += 1
        if k in in_sub:
            continue
        if op == "NOP":
            continue
        rep.instructions += 1
        text = ", ".join(ins.operands)
        if op.startswith("I2F") and ".RP" in op:
            rep.inline_divs += 1
        if op.startswith(("IMAD", "IMUL", "UIMAD")) and PHILOX_MUL_RE.search(text):
            philox_seen += 1
            rep.philox_muls += 1
        if PHILOX_KEY_RE.search(text) and op.split(".")[0] in ("VIADD", "IADD3", "IADD", "UIADD3", "IADD32I", "UIADD"):
            if op.startswith("U"):
                rep.key_adds_uniform += 1
            else:
                rep.key_adds_thread += 1

        tainted = taint_before[k]
        if _is_mem(op, ("LDG", "LD")) and ins.operands:
            data = any(r in tainted for r in _address_regs(ins.operands[-1]))
            if data:
                wide = _is_wide(op)
                if wide:
                    rep.ld16 += 1
                else:
                    rep.ld_narrow += 1
                if first_load_k is None:
                    first_load_k = philox_seen
                    first_load_at = k
                if wide and first_wide_load_k is None:
                    first_wide_load_k = philox_seen
                    first_wide_load_at = k
            else:
                rep.rng_loads += 1
                rng_loads_at.append(k)
        if _is_mem(op, ("STG", "ST")) and ins.operands:
            if any(r in tainted for r in _address_regs(ins.operands[0])):
                if _is_wide(op):
                    rep.st16 += 1
                else:
                    rep.st_narrow += 1
    rep.muls_before_load = first_wide_load_k if first_wide_load_k is not None else first_load_k
    data_at = first_wide_load_at if first_wide_load_at is not None else first_load_at
    if data_at is not None:
        bounds, succ = basic_blocks(instrs)
        rep.rng_before_data = any(reaches(bounds, succ, r, data_at) for r in rng_loads_at)

    if (rep.local or 0) > 0 or (rep.stack or 0) > 0 or rep.local_instrs > 0:
        rep.failures.append(f"local memory: LOCAL={rep.local} STACK={rep.stack}, {rep.local_instrs} LDL/STL")
    if rep.needs_vector and (rep.ld16 == 0 or rep.st16 == 0):
        rep.failures.append(f"vector kernel ({rep.why}) without 16-byte "
                            + " and ".join(w for w, n in (("loads", rep.ld16), ("stores", rep.st16)) if n == 0))
    return rep


def report_for_arch(tool: str, so: str, arch: str, source_dir: str) -> List[KernelReport]:
    sass = _run(tool, "-sass", "-arch", arch, so)
    usage = parse_resource_usage(_run(tool, "-res-usage", "-arch", arch, so))
    functions = parse_sass(sass)
    names = demangle_all(sorted({f[1] for f in functions}))
    params = kernel_template_params(source_dir) if os.path.isdir(source_dir) else {}
    reports = [analyse(arch, cubin, name, instrs, usage.get((cubin, name), {}), names[name], params)
               for cubin, name, instrs in functions]
    reports.sort(key=lambda r: (r.family, r.kernel, r.args))
    return reports


# ---------------------------------------------------------------------------------------------
# Output


COLUMNS = [("kernel", 40), ("template args", 34), ("regs", 5), ("smem", 6), ("stack", 6), ("lmem", 5), ("ld16", 5),
           ("st16", 5), ("ld<16", 6), ("st<16", 6), ("divcall", 8), ("idiv", 5), ("philox", 7),
           ("mul<ld", 7), ("rng1st", 7), ("keyadd", 7), ("instr", 6), ("16B?", 5), ("check", 6)]


def format_table(reports: Sequence[KernelReport]) -> str:
    def row(values):
        return " ".join(f"{str(v):<{w}}" if k < 2 else f"{str(v):>{w}}" for k, ((_, w), v) in enumerate(zip(COLUMNS, values)))

    lines = [row([c for c, _ in COLUMNS]), "-" * (sum(w for _, w in COLUMNS) + len(COLUMNS) - 1)]
    for r in reports:
        def opt(v):
            return "-" if v is None else v
        lines.append(row([
            r.kernel[:40], r.args[:34], opt(r.regs), opt(r.shared), opt(r.stack), r.local_instrs + (r.local or 0),
            r.ld16, r.st16, r.ld_narrow, r.st_narrow, r.div_calls, r.inline_divs, r.philox_muls,
            opt(r.muls_before_load), "-" if r.rng_before_data is None else ("yes" if r.rng_before_data else "no"),
            f"{r.key_adds_thread}/{r.key_adds_uniform}", r.instructions,
            "req" if r.needs_vector else "-", "FAIL" if r.failures else "ok"]))
    return "\n".join(lines)


LEGEND = """\
columns: regs = registers per thread; smem = static shared memory bytes; stack = stack frame bytes; lmem = LOCAL bytes + LDL/STL
instructions; ld16/st16 = 16-byte (or wider) data loads/stores; ld<16/st<16 = narrower data
accesses; divcall = call sites of division subroutines; idiv = integer divisions inline;
philox = Philox multiplies (20 per Philox4x32-10 call); mul<ld = Philox multiplies before the
first 16-byte data load (first data load if none; 0 = loads issued first); rng1st = a
(seed, offset) load can run before that data load (on some path); keyadd = key-schedule adds per thread/uniform;
instr = static instructions (subroutines excluded); 16B? = req: a vector kernel that must have
16-byte loads and stores."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("extension", nargs="?", help="the built fastdropout/_C*.so (default: found)")
    ap.add_argument("--arch", action="append", help="SASS architecture(s) to report, e.g. sm_90 (default: all)")
    ap.add_argument("--cuobjdump", default=None, help="cuobjdump to use (default: searched)")
    ap.add_argument("--source-dir", default=os.path.join(REPO, "csrc"), help="CUDA sources (template parameter names)")
    ap.add_argument("--json", default=None, help="also write the per-kernel figures here")
    ap.add_argument("--find-cuobjdump", action="store_true", help="print the cuobjdump that would be used and exit")
    args = ap.parse_args(argv)
    if args.find_cuobjdump:
        tool = args.cuobjdump or find_cuobjdump()
        print(tool or "none")
        return 0 if tool else 2

    so = args.extension or find_extension()
    if not so or not os.path.exists(so):
        print("sass_report: no fastdropout extension found (build it first)", file=sys.stderr)
        return 2
    tool = args.cuobjdump or find_cuobjdump()
    if tool is None:
        print("sass_report: no cuobjdump found (CUDA toolkit, nvidia-cuda-cuobjdump or triton wheel)", file=sys.stderr)
        return 2
    cubins, ptx = list_embedded(tool, so)
    print(f"# SASS report of {so}")
    print(f"# cuobjdump: {tool}")
    print(f"# cubins: {', '.join(cubins) or 'none'}")
    print(f"# PTX: {', '.join(ptx) or 'none'} (SASS archs {', '.join(archs_of(cubins)) or '-'}; "
          f"PTX archs {', '.join(archs_of(ptx)) or '-'})")
    if not cubins:
        print("sass_report: the extension has no CUDA kernels (CPU-only build)", file=sys.stderr)
        return 2
    archs = args.arch or archs_of(cubins)
    all_reports: List[KernelReport] = []
    for arch in archs:
        reports = report_for_arch(tool, so, arch, args.source_dir)
        if not reports:
            print(f"sass_report: no {arch} kernels in {so}", file=sys.stderr)
            return 2
        print(f"\n## {arch}: {len(reports)} kernel instantiations")
        print(format_table(reports))
        all_reports += reports
    print("\n" + LEGEND)
    unmatched = sorted({r.kernel for r in all_reports if "no source found" in r.why})
    if unmatched:
        print(f"\nnote: no definition under {args.source_dir} for {', '.join(unmatched)}: "
              "classified as vector kernels by name")
    failures = [(r, f) for r in all_reports for f in r.failures]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"extension": so, "cubins": cubins, "ptx": ptx,
                       "kernels": [asdict(r) for r in all_reports]}, f, indent=1)
    if failures:
        print(f"\nFAILED: {len(failures)} problem(s)")
        for r, f in failures:
            print(f"  {r.arch} {r.kernel}{r.args}: {f}")
        return 1
    print(f"\nOK: {len(all_reports)} kernel instantiations, no local memory, every vector kernel has 16-byte loads and stores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
