"""Main-process CPU per slice of a processes-backend run (dispatcher, writer, producer, sampler), in-process."""
import os, sys, time, shutil, tempfile, json
repo, inp, workers, backend = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
sys.path.insert(0, repo); os.chdir(repo)
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(repo, ".numba_cache"))
import cli
d = tempfile.mkdtemp(dir="/tmp")
out = os.path.join(d, "s.h5")
# warm-up on 2 volumes so the kernels are loaded
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    cli.main(["preprocess", "--input", "/tmp/w2", "--backend", backend, "--threads", workers, "--out", os.path.join(d, "w.h5"), "--no-progress"])
t0 = os.times(); w0 = time.perf_counter()
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    rc = cli.main(["preprocess", "--input", inp, "--backend", backend, "--threads", workers, "--out", out, "--no-progress"])
t1 = os.times(); w1 = time.perf_counter()
p = json.load(open(out + ".profile.json"))
n = p["slices"]
main_ms = 1e3 * ((t1.user - t0.user) + (t1.system - t0.system)) / n
kids_ms = 1e3 * ((t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)) / n
print(json.dumps({"repo": repo, "rc": rc, "slices": n, "engine_fps": p["slices_per_s"], "main_cpu_ms_per_slice": round(main_ms, 3),
                  "children_cpu_ms_per_slice": round(kids_ms, 3), "wall_s": round(w1 - w0, 2)}))
shutil.rmtree(d)
