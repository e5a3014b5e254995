"""The machine-code report (scripts/sass_report.py): its analysis on small SASS listings, and the
report itself on the built extension's kernels (no GPU needed; needs cuobjdump).

On the built extension the report must pass: no kernel uses local memory (spills, stack frame,
LDL/STL), and every plain or fused vector kernel has 16-byte loads and 16-byte stores, each
instantiation checked on its own. Under CI (the CI variable set) a CUDA build without a
cuobjdump fails instead of skipping, so that the check cannot silently drop out.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

import fastdropout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "sass_report.py")

_spec = importlib.util.spec_from_file_location("sass_report", SCRIPT)
sass_report = importlib.util.module_from_spec(_spec)
sys.modules["sass_report"] = sass_report  # dataclasses look their module up there
_spec.loader.exec_module(sass_report)


# A kernel template as the CUDA sources declare them, and listings in cuobjdump's format.
SOURCE = """
template <typename scalar_t, bool kAligned>
__global__ void __launch_bounds__(256)
dropout_cuda_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t n) {}
"""
# dropout_cuda_kernel<float, true> / <float, false>
ANON = "_GLOBAL__N__0123abcd_10_dropout_cu_89abcdef"
MANGLED_TRUE = f"_ZN11fastdropout{len(ANON)}{ANON}19dropout_cuda_kernelIfLb1EEEvPKT_PS2_l"
MANGLED_FALSE = MANGLED_TRUE.replace("IfLb1EE", "IfLb0EE")

PROLOGUE = """\
        /*0000*/                   LDC R1, c[0x0][0x28] ;                     /* 0x00000a00ff017b82 */
        /*0010*/                   LDC.64 R2, c[0x0][0x248] ;                 /* 0x0 */
        /*0020*/                   LDG.E.64 R10, desc[UR4][R2.64] ;           /* 0x0 */
        /*0030*/                   S2R R0, SR_TID.X ;                         /* 0x0 */
        /*0040*/                   ULDC.64 UR6, c[0x0][0x210] ;               /* 0x0 */
        /*0050*/                   IMAD.WIDE.U32 R4, R0, 0x10, RZ ;           /* 0x0 */
        /*0060*/                   IADD3 R6, P0, R4, UR6, RZ ;                /* 0x0 */
        /*0070*/                   IADD3.X R7, R5, UR7, RZ, P0, !PT ;         /* 0x0 */
"""


def listing(name: str, body: str) -> str:
    return ("\tcode for sm_90\n\tidentifier = /src/dropout.cu\n"
            f"\t\tFunction : {name}\n\t.headerflags\t@\"EF_CUDA_SM90\"\n" + PROLOGUE + body)


def analyse(name: str, body: str, usage=None, source=SOURCE, tmp_path=None):
    (cubin, mangled, instrs), = sass_report.parse_sass(listing(name, body))
    params = {}
    if tmp_path is not None:
        (tmp_path / "k.cu").write_text(source)
        params = sass_report.kernel_template_params(str(tmp_path))
    demangled = sass_report.demangle_all([mangled])[mangled]
    return sass_report.analyse("sm_90", cubin, mangled, instrs, usage or {"REG": 20, "STACK": 0, "LOCAL": 0},
                               demangled, params)


VECTOR_BODY = """\
        /*0080*/                   LDG.E.128.CONSTANT R12, desc[UR4][R6.64] ; /* 0x0 */
        /*0090*/                   IMAD.WIDE.U32 R16, R10, -0x2daee0ad, RZ ;  /* 0x0 */
        /*00a0*/                   IMAD.WIDE.U32 R18, R11, -0x326172a9, RZ ;  /* 0x0 */
        /*00b0*/                   VIADD R20, R10, 0x9e3779b9 ;               /* 0x0 */
        /*00c0*/                   UIADD3 UR8, UR6, -0x61c88647, URZ ;        /* 0x0 */
        /*00d0*/                   STG.E.128 desc[UR4][R6.64], R12 ;          /* 0x0 */
        /*00e0*/                   EXIT ;                                     /* 0x0 */
        /*00f0*/                   BRA 0xf0;                                  /* 0x0 */
"""


def test_vector_kernel_with_16_byte_accesses_passes(tmp_path):
    r = analyse(MANGLED_TRUE, VECTOR_BODY, tmp_path=tmp_path)
    assert (r.kernel, r.args, r.family) == ("dropout_cuda_kernel", "<fp32, kAligned=true>", "plain")
    assert r.needs_vector and r.failures == []
    assert (r.ld16, r.st16, r.ld_narrow, r.st_narrow) == (1, 1, 0, 0)
    assert r.rng_loads == 1 and r.rng_before_data is True  # the LDG of c[0x248] is not a data load
    assert r.philox_muls == 2 and r.muls_before_load == 0  # the data load is issued first
    assert (r.key_adds_thread, r.key_adds_uniform) == (1, 1)


def test_vector_kernel_without_16_byte_store_fails_but_its_scalar_twin_does_not(tmp_path):
    narrow = VECTOR_BODY.replace("STG.E.128 desc[UR4][R6.64], R12", "STG.E desc[UR4][R6.64], R12")
    r = analyse(MANGLED_TRUE, narrow, tmp_path=tmp_path)
    assert r.st16 == 0 and r.st_narrow == 1
    assert len(r.failures) == 1 and "16-byte stores" in r.failures[0]
    assert analyse(MANGLED_FALSE, narrow, tmp_path=tmp_path).failures == []


def test_a_loop_exit_call_is_not_a_subroutine(tmp_path):
    """ptxas leaves a divergent loop through CALL.REL.NOINC to its BSYNC (the loop branches
    back otherwise): the code after that is still the kernel's, reached only through the CALL
    (its 16-byte store counts), and no RET means no subroutine."""
    body = VECTOR_BODY.replace(
        "        /*00d0*/                   STG.E.128",
        "        /*00c4*/               @P1 CALL.REL.NOINC 0xcc ;                      /* 0x0 */\n"
        "        /*00c8*/                   BRA 0x80 ;                                 /* 0x0 */\n"
        "        /*00cc*/                   BSYNC B0 ;                                 /* 0x0 */\n"
        "        /*00d0*/                   STG.E.128")
    r = analyse(MANGLED_TRUE, body, tmp_path=tmp_path)
    assert r.failures == [] and r.st16 == 1 and r.div_calls == 0


def test_vector_kernel_without_a_source_definition_is_still_checked():
    r = analyse(MANGLED_TRUE.replace("19dropout_cuda_kernel", "19dropout_fwd_cuda_kernel"),
                VECTOR_BODY.replace(".128", ""))
    assert r.needs_vector and r.failures


def test_local_memory_fails_any_kernel(tmp_path):
    spill = VECTOR_BODY.replace("        /*00e0*/                   EXIT ;",
                                "        /*00d8*/                   STL [R1], R3 ;\n        /*00e0*/                   EXIT ;")
    r = analyse(MANGLED_FALSE, spill, tmp_path=tmp_path)
    assert r.local_instrs == 1 and any("local memory" in f for f in r.failures)
    r = analyse(MANGLED_FALSE, VECTOR_BODY, usage={"REG": 20, "STACK": 16, "LOCAL": 0}, tmp_path=tmp_path)
    assert any("local memory" in f for f in r.failures)


def test_philox_before_load_and_division_subroutine_are_counted(tmp_path):
    body = """\
        /*0080*/                   IMAD.WIDE.U32 R16, R10, -0x2daee0ad, RZ ;  /* 0x0 */
        /*0090*/                   CALL.REL.NOINC 0x100 ;                     /* 0x0 */
        /*00a0*/                   I2F.U32.RP R9, R8 ;                        /* 0x0 */
        /*00b0*/                   LDG.E.128.CONSTANT R12, desc[UR4][R6.64] ; /* 0x0 */
        /*00c0*/                   STG.E.128 desc[UR4][R6.64], R12 ;          /* 0x0 */
        /*00d0*/                   EXIT ;                                     /* 0x0 */
        /*0100*/                   I2F.U64.RP R7, UR4 ;                       /* 0x0 */
        /*0110*/                   MUFU.RCP R7, R7 ;                          /* 0x0 */
        /*0120*/                   RET.REL.NODEC R8 0x0 ;                     /* 0x0 */
"""
    r = analyse(MANGLED_TRUE, body, tmp_path=tmp_path)
    assert r.muls_before_load == 1 and r.div_calls == 1 and r.inline_divs == 1


def test_template_parameters_are_read_from_the_sources():
    params = sass_report.kernel_template_params(os.path.join(ROOT, "csrc"))
    assert params, "no __global__ kernel found under csrc/"
    assert all(name.endswith("_cuda_kernel") for name in params), sorted(params)


def test_mini_demangler_reads_kernel_names():
    name = ("_ZN11fastdropout48_GLOBAL__N__dceb751f_15_dropout_cuda_cu_61d7d73d36bias_dropout_add_forward_cuda_kernel"
            "IN3c108BFloat16ELb0ELb1EEEvPKT_S6_S6_PS4_llNS0_9RngSourceEjNSt11conditionalIXsr3std7is_sameIS4_dEE5valueEdfE4typeE")
    assert sass_report._MiniDemangler(name).function_name() == (
        "fastdropout::(anonymous namespace)::bias_dropout_add_forward_cuda_kernel<c10::BFloat16, false, true>")
    assert sass_report.split_template("void ns::(anonymous namespace)::k<c10::Half, 8, true>(float const*, long)") == (
        "k", ["c10::Half", "8", "true"])


def test_report_on_the_built_extension():
    if not fastdropout.cuda_kernels_built():
        pytest.skip("CPU-only build: no CUDA kernels to report on")
    tool = sass_report.find_cuobjdump()
    if tool is None:
        message = "CUDA build but no cuobjdump (CUDA toolkit, nvidia-cuda-cuobjdump or triton wheel)"
        if os.environ.get("CI"):
            pytest.fail(message + ": under CI the machine-code report must run")
        pytest.skip(message)
    so = sass_report.find_extension()
    proc = subprocess.run([sys.executable, SCRIPT, so, "--cuobjdump", tool], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    # Every plain/fused kernel of the build was matched to its definition under csrc/ (so that
    # its vector/scalar classification comes from its template parameters, not a fallback).
    assert "no definition under" not in proc.stdout


def test_vector_or_scalar_from_template_parameters():
    expect = sass_report.vector_expectation
    partials = [("typename", "scalar_t"), ("int", "kCols"), ("bool", "kMask")]
    assert expect("bias_grad_partials_cuda_kernel", ["float", "8", "true"], partials)[0]
    assert not expect("bias_grad_partials_cuda_kernel", ["float", "1", "false"], partials)[0]
    channel = [("typename", "scalar_t"), ("bool", "kVector")]
    assert expect("channel_dropout_cuda_kernel", ["c10::Half", "true"], channel)[0]
    assert not expect("channel_dropout_cuda_kernel", ["c10::Half", "false"], channel)[0]
    assert expect("dropout_cuda_kernel", ["float"], [("typename", "scalar_t")])[0]  # vector body expected
    assert not expect("keep_mask_cuda_kernel", [], [])[0]
    assert not expect("bias_grad_fan_in_cuda_kernel", ["float", "true"], [("typename", "scalar_t"), ("bool", "kFinal")])[0]


def test_data_loads_are_told_by_dataflow_not_by_layout(tmp_path):
    # The block at 0x40 (record the rng state, exit) redefines R4 from a constant; the data
    # path at 0x70 is reached by the branch and still addresses through the thread's R4.
    text = ("\tidentifier = /src/dropout.cu\n"
            f"\t\tFunction : {MANGLED_TRUE}\n"
            "        /*0000*/                   S2R R0, SR_TID.X ;                         /* 0x0 */\n"
            "        /*0010*/                   IMAD.WIDE.U32 R4, R0, 0x10, RZ ;           /* 0x0 */\n"
            "        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;        /* 0x0 */\n"
            "        /*0030*/              @!P0 BRA 0x70 ;                                 /* 0x0 */\n"
            "        /*0040*/                   LDC.64 R4, c[0x0][0x250] ;                 /* 0x0 */\n"
            "        /*0050*/                   STG.E.64 desc[UR4][R4.64], R2 ;            /* 0x0 */\n"
            "        /*0060*/                   EXIT ;                                     /* 0x0 */\n"
            "        /*0070*/                   LDG.E.128 R8, desc[UR4][R4.64] ;           /* 0x0 */\n"
            "        /*0080*/                   STG.E.128 desc[UR4][R4.64], R8 ;           /* 0x0 */\n"
            "        /*0090*/                   EXIT ;                                     /* 0x0 */\n")
    (cubin, mangled, instrs), = sass_report.parse_sass(text)
    r = sass_report.analyse("sm_90", cubin, mangled, instrs, {"REG": 16, "STACK": 0, "LOCAL": 0},
                            sass_report.demangle_all([mangled])[mangled], {})
    assert (r.ld16, r.st16, r.st_narrow) == (1, 1, 0)  # the record store is not a data store
    assert r.rng_before_data is False
