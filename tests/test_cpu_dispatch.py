"""One build runs on every x86-64 CPU: the CPU kernels of each capability are in their own
library, and import loads the best one the CPU offers (csrc/cpu/kernels.h).

  - Under an emulated CPU (Debian's qemu-user-static: -cpu Nehalem has no AVX, -cpu Haswell
    no AVX-512), the same build imports, chooses DEFAULT or AVX2, and its layers and
    network match eager. An AVX-512 instruction reached there would kill the process.
  - No instruction of a richer capability is in a poorer path: objdump of each library.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

import handgrad
from handgrad import _capability

PACKAGE = os.path.dirname(handgrad.__file__)
TESTS = os.path.dirname(os.path.abspath(__file__))  # samples.py, for the emulated run
QEMU = shutil.which("qemu-x86_64-static")
X86 = os.uname().machine in ("x86_64", "amd64")

# Run under the emulated CPU: a few cases of every op family against eager, on float32 and
# float64, with shapes that end in partial registers and partial tiles of rows.
EMULATED_CHECK = r"""
import sys, torch, torch.nn.functional as F
import handgrad, handgrad.functional as hf
sys.path.insert(0, TESTS)
from samples import eager_activation, eager_layer, fused_layer, handgrad_activation, tolerances
info = handgrad.build_info()
print("capability", info["cpu_capability"], info["cpu_capability_offered"])
torch.manual_seed(0)
for dtype in (torch.float32, torch.float64):
    tol = tolerances(dtype, summed=True)
    x = torch.randn(37, 29, dtype=dtype, requires_grad=True)
    w = (torch.randn(21, 29, dtype=dtype) / 5).requires_grad_()
    b = torch.randn(21, dtype=dtype, requires_grad=True)
    for name, parameters in [("relu", {}), ("sigmoid", {}), ("leaky_relu", {"negative_slope": -0.2}), ("tanh", {}),
                             ("silu", {}), ("gelu_tanh", {}), ("softplus", {"beta": 3.0, "threshold": 1.0})]:
        out, want = fused_layer(name, **parameters)(x, w, b), eager_layer(name, **parameters)(x, w, b)
        torch.testing.assert_close(out, want, **tol)
        g = torch.randn_like(out)
        for a, e in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(want, (x, w, b), g)):
            torch.testing.assert_close(a, e, **tol)
    for name, parameters in [("sigmoid", {}), ("tanh", {}), ("gelu", {}), ("softplus", {"beta": 100.0})]:
        torch.testing.assert_close(handgrad_activation(name, **parameters)(x), eager_activation(name, **parameters)(x), **tol)
    sizes = [29, 40, 33, 40, 5]
    ws = [(torch.randn(o, i, dtype=dtype) / i ** 0.5).requires_grad_() for i, o in zip(sizes, sizes[1:])]
    bs = [torch.randn(o, dtype=dtype, requires_grad=True) for o in sizes[1:]]
    out = hf.mlp(x, ws, bs, "relu", checkpoint_every=2)
    h = x
    for layer, (wl, bl) in enumerate(zip(ws, bs)):
        h = F.linear(h, wl, bl)
        h = F.relu(h) if layer + 1 < len(ws) else h
    torch.testing.assert_close(out, h, **tol)
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, [x, *ws, *bs], g), torch.autograd.grad(h, [x, *ws, *bs], g)):
        torch.testing.assert_close(a, e, **tol)
    # The double backward (a gradient penalty) of a tanh network against eager's.
    penalties = []
    for network in (lambda x: hf.mlp(x, ws, bs, "tanh"),
                    lambda x: F.linear(torch.tanh(F.linear(torch.tanh(F.linear(torch.tanh(F.linear(
                        x, ws[0], bs[0])), ws[1], bs[1])), ws[2], bs[2])), ws[3], bs[3])):
        xi = x.detach().requires_grad_()
        (gx,) = torch.autograd.grad(network(xi).sum(), xi, create_graph=True)
        penalties.append(torch.autograd.grad(gx.pow(2).sum(), [*ws, *bs[:-1]]))  # not the output bias: unused
    for a, e in zip(*penalties):
        torch.testing.assert_close(a, e, **tol)
print("ok")
"""


@pytest.mark.skipif(not X86, reason="x86-64 CPUs only")
@pytest.mark.parametrize("cpu,capability", [("Nehalem", "DEFAULT"), ("Haswell", "AVX2")])
def test_one_build_runs_on_an_emulated_older_cpu(cpu, capability):
    if QEMU is None:
        pytest.skip("needs qemu-x86_64-static: apt-get install qemu-user-static (.ci/run installs it)")
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        # Killed (SIGKILL) there: AddressSanitizer's shadow memory does not fit qemu-user.
        pytest.skip("the sanitized build (make sanitize) does not run under qemu-user")
    env = {k: v for k, v in os.environ.items() if k not in ("HANDGRAD_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    result = subprocess.run([QEMU, "-cpu", cpu, sys.executable, "-c", f"TESTS = {TESTS!r}\n" + EMULATED_CHECK], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"capability {capability} {capability}" in result.stdout
    assert result.stdout.strip().endswith("ok")


def libraries():
    return {os.path.basename(path).split(".")[0]: path for path in glob.glob(os.path.join(PACKAGE, "_*.so"))}


# Registers and encodings that a capability's path must not contain: AVX (ymm) beyond
# DEFAULT, and AVX-512 (zmm, mask registers, the upper 16 vector registers) beyond AVX2.
FORBIDDEN = {
    "DEFAULT": re.compile(r"%ymm|%zmm|\{%k[0-7]\}|%xmm(1[6-9]|2[0-9]|3[01])\b"),
    "AVX2": re.compile(r"%zmm|\{%k[0-7]\}|%[xy]mm(1[6-9]|2[0-9]|3[01])\b"),
}


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="x86-64 and binutils' objdump only")
@pytest.mark.parametrize("library,capability", [("_C", "DEFAULT"), ("_cpu_DEFAULT", "DEFAULT"), ("_cpu_AVX2", "AVX2")])
def test_no_richer_instruction_is_in_a_poorer_path(library, capability):
    path = libraries().get(library)
    if path is None:
        pytest.skip(f"{library} is not in this build")
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                             check=True).stdout
    bad = [line for line in listing.splitlines() if FORBIDDEN[capability].search(line)]
    assert not bad, f"{library} contains instructions beyond {capability}:\n" + "\n".join(bad[:10])
    if library == "_cpu_AVX2":  # the scan sees what it looks for where it is allowed
        assert re.search(r"%ymm", listing)
        avx512 = subprocess.run(["objdump", "-d", libraries()["_cpu_AVX512"]], capture_output=True, text=True).stdout
        assert FORBIDDEN["AVX2"].search(avx512)


def test_each_capability_library_exports_its_table_alone():
    # Hidden symbols: no inline function or template instance compiled for one capability
    # can stand in for another's (pytorch#43300).
    if shutil.which("nm") is None:
        pytest.skip("needs binutils' nm")
    for name, path in libraries().items():
        if not name.startswith("_cpu_"):
            continue
        symbols = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True,
                                 check=True).stdout.split()
        functions = [s for s in symbols if s.startswith("handgrad") or s.startswith("_Z") and "handgrad" in s]
        assert functions == ["handgrad_cpu_kernels"], f"{name} exports {functions}"


def test_every_runnable_capability_loads_and_says_what_it_runs(cpu_capability):
    info = handgrad.build_info()
    assert info["cpu_capability"] == cpu_capability
    assert _capability.running()[0] == cpu_capability


def test_build_info_says_whether_the_kernels_were_built_with_openmp():
    # A build without OpenMP (HANDGRAD_OPENMP=0, or a compiler that rejects -fopenmp) runs
    # at::parallel_for as a plain call; its libraries then need no OpenMP runtime.
    if shutil.which("objdump") is None:
        pytest.skip("needs binutils' objdump")
    info = handgrad.build_info()
    for name, path in libraries().items():
        if not name.startswith("_cpu_"):
            continue
        headers = subprocess.run(["objdump", "-p", path], capture_output=True, text=True, check=True).stdout
        needed = re.findall(r"NEEDED\s+(\S+)", headers)
        assert any(re.match(r"lib(g|i)?omp", n) for n in needed) == info["openmp"], (name, needed)
    assert info["cpu_kernel_threads"] == ("torch's intra-op threads" if info["openmp"] else "one (built without OpenMP)")


def test_a_capability_this_cpu_lacks_is_named_and_the_best_it_offers_runs():
    # On Arm (make check-aarch64) and on CPUs without AVX-512, asking for an x86 level the
    # CPU lacks warns, naming it and what runs instead; a name that is no level is an error.
    lacking = [c for c in _capability.LEVELS if _capability.LEVELS.index(c) > _capability.LEVELS.index(_capability.offered())]
    with pytest.raises(ValueError, match=r"HANDGRAD_CPU_CAPABILITY='SSE9' is not a CPU capability; expected one of DEFAULT, AVX2, AVX512"):
        _capability.choose("sse9")
    if not lacking:
        pytest.skip(f"this CPU offers {_capability.offered()}, the highest level")
    best = _capability.runnable()[-1]
    with pytest.warns(RuntimeWarning, match=rf"{lacking[-1]} cannot run here \(this CPU offers {_capability.offered()}.*running {best}"):
        assert _capability.choose(lacking[-1]) == best
