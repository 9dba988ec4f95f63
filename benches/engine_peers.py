#!/usr/bin/env python3
"""fpipe against DVC and Snakemake on identical shell DAGs, side by side in one run.

Cases (per engine): cold run, no-op rerun, rerun after one parameter change (two stages
rerun), and status / dry run; for a 10-stage and a 1,000-stage DAG; plus status with a
10,000-file input folder. Each stage is a tiny `sh` command, so what is measured is the
engine's own overhead. Run through `benches/engine-peers.sh`, which installs the peers.

Shape: stage i > 0 reads stage (i-1)//3 (a tree with fan-out 3), except the last stage,
which reads the one before it; the parameter `p` is used by the second-to-last stage only,
so changing it reruns exactly two stages in every engine.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def parent(i, n):
    if i == 0:
        return None
    if i == n - 1:
        return n - 2
    return (i - 1) // 3


def write_fpipe(d, n, tree=None):
    lines = ["fpipe: 1", "params: {p: 1}", "stages:"]
    for i in range(n):
        par = parent(i, n)
        extra = " {{ params.p }}" if i == n - 2 else ""
        if par is None:
            dep = ""
            if tree:
                lines.append(f"  s{i}:\n    uses: shell\n    with:\n      run: \"ls data | wc -l > out.txt\"\n      deps: [data]\n      outputs: [out.txt]")
                continue
            cmd = f"echo s{i}{extra} > out.txt"
            inputs = ""
        else:
            cmd = f"cat in/x/out.txt > out.txt; echo s{i}{extra} >> out.txt"
            inputs = f"\n    inputs: {{x: s{par}}}"
        lines.append(f"  s{i}:\n    uses: shell{inputs}\n    with:\n      run: \"{cmd}\"\n      outputs: [out.txt]")
    open(os.path.join(d, "pipeline.yaml"), "w").write("\n".join(lines) + "\n")


def write_dvc(d, n, tree=None):
    stages = []
    for i in range(n):
        par = parent(i, n)
        extra = " ${p}" if i == n - 2 else ""
        if par is None:
            if tree:
                stages.append(f"  s{i}:\n    cmd: ls data | wc -l > out/s{i}.txt\n    deps: [data]\n    outs: [out/s{i}.txt]")
                continue
            cmd = f"echo s{i}{extra} > out/s{i}.txt"
            deps = ""
        else:
            cmd = f"cat out/s{par}.txt > out/s{i}.txt; echo s{i}{extra} >> out/s{i}.txt"
            deps = f"\n    deps: [out/s{par}.txt]"
        params = "\n    params: [p]" if i == n - 2 else ""
        stages.append(f"  s{i}:\n    cmd: sh -c \"{cmd}\"{deps}{params}\n    outs: [out/s{i}.txt]")
    open(os.path.join(d, "dvc.yaml"), "w").write("stages:\n" + "\n".join(stages) + "\n")
    open(os.path.join(d, "params.yaml"), "w").write("p: 1\n")
    os.makedirs(os.path.join(d, "out"), exist_ok=True)


def write_snakemake(d, n, tree=None):
    rules = ["configfile: 'config.yaml'", "rule all:", f"    input: [f'out/s{{i}}.txt' for i in range({n})]", ""]
    for i in range(n):
        par = parent(i, n)
        if par is None:
            if tree:
                rules.append(f"rule s{i}:\n    input: [os.path.join('data', f) for f in sorted(os.listdir('data'))]\n    output: 'out/s{i}.txt'\n    shell: 'ls data | wc -l > {{output}}'\n")
                continue
            rules.append(f"rule s{i}:\n    output: 'out/s{i}.txt'\n    shell: 'echo s{i} > {{output}}'\n")
        else:
            params = "\n    params: p=lambda wildcards: config['p']" if i == n - 2 else ""
            extra = " {params.p}" if i == n - 2 else ""
            rules.append(f"rule s{i}:\n    input: 'out/s{par}.txt'\n    output: 'out/s{i}.txt'{params}\n    shell: 'cat {{input}} > {{output}}; echo s{i}{extra} >> {{output}}'\n")
    open(os.path.join(d, "Snakefile"), "w").write("import os\n" + "\n".join(rules))
    open(os.path.join(d, "config.yaml"), "w").write("p: 1\n")


class Engine:
    def __init__(self, name, venv, fpipe):
        self.name, self.venv, self.fpipe = name, venv, fpipe

    def setup(self, d, n, tree=None):
        if tree:
            os.symlink(tree, os.path.join(d, "data"))
        if self.name == "fpipe":
            write_fpipe(d, n, tree)
        elif self.name == "dvc":
            write_dvc(d, n, tree)
            run([self.bin("dvc"), "init", "--no-scm", "-q"], d)
            run([self.bin("dvc"), "config", "core.analytics", "false"], d)
        else:
            write_snakemake(d, n, tree)

    def bin(self, tool):
        return os.path.join(self.venv, "bin", tool)

    def set_param(self, d, v):
        if self.name == "fpipe":
            self.extra = ["-p", f"p={v}"]
        elif self.name == "dvc":
            open(os.path.join(d, "params.yaml"), "w").write(f"p: {v}\n")
        else:
            open(os.path.join(d, "config.yaml"), "w").write(f"p: {v}\n")

    def repro(self, d):
        if self.name == "fpipe":
            return [self.fpipe, "run", "pipeline.yaml", "-j", "1"] + getattr(self, "extra", [])
        if self.name == "dvc":
            return [self.bin("dvc"), "repro", "-q"]
        return [self.bin("snakemake"), "--cores", "1", "--quiet", "all"]

    def status(self, d):
        if self.name == "fpipe":
            return [self.fpipe, "status", "pipeline.yaml"] + getattr(self, "extra", [])
        if self.name == "dvc":
            return [self.bin("dvc"), "status", "-q"]
        return [self.bin("snakemake"), "--cores", "1", "-n", "--quiet", "all"]


def run(cmd, cwd, check=True):
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONWARNINGS="ignore")
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    dt = time.perf_counter() - t
    # dvc status exits 1 when something changed; that is an answer, not a failure.
    if check and p.returncode not in (0, 1):
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{p.stdout.decode()}\n{p.stderr.decode()}")
    return dt


def measure(engine, n, reps, tree=None):
    res = {"cold": [], "noop": [], "param": [], "status": []}
    for r in range(reps):
        d = tempfile.mkdtemp(prefix=f"bench-{engine.name}-{n}-")
        engine.extra = []
        engine.setup(d, n, tree)
        res["cold"].append(run(engine.repro(d), d))
        res["noop"].append(run(engine.repro(d), d))
        res["status"].append(run(engine.status(d), d))
        engine.set_param(d, 2 + r)
        res["param"].append(run(engine.repro(d), d))
        shutil.rmtree(d, ignore_errors=True)
    return {k: statistics.median(v) for k, v in res.items() if v}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fpipe", required=True)
    ap.add_argument("--venv", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--big-reps", type=int, default=1)
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    engines = [Engine(n, a.venv, a.fpipe) for n in ("fpipe", "dvc", "snakemake")]
    out = {}
    print(f"# engine overhead, median seconds ({a.reps} reps for 10 stages, {a.big_reps} for 1,000)")
    for n, reps in ((10, a.reps), (1000, a.big_reps)):
        for e in engines:
            out[f"{e.name}/{n}"] = measure(e, n, reps)
            print(f"{e.name:10s} {n:5d} stages: " + "  ".join(f"{k} {v:.3f}" for k, v in out[f"{e.name}/{n}"].items()), flush=True)
    # Status with a 10,000-file input folder (after a first run, so hashes are memoised where
    # the engine memoises them).
    tree = tempfile.mkdtemp(prefix="bench-tree-")
    for i in range(10000):
        with open(os.path.join(tree, f"f{i:05d}.txt"), "w") as f:
            f.write(f"file {i}\n")
    for e in engines:
        d = tempfile.mkdtemp(prefix=f"bench-{e.name}-tree-")
        e.extra = []
        e.setup(d, 2, tree)
        run(e.repro(d), d)
        ts = [run(e.status(d), d) for _ in range(a.reps)]
        out[f"{e.name}/tree"] = {"status": statistics.median(ts)}
        print(f"{e.name:10s} status with 10,000 input files: {statistics.median(ts):.3f}", flush=True)
        shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(tree, ignore_errors=True)
    print("\n# ratios (peer time / fpipe time; higher is better for fpipe)")
    for n in (10, 1000):
        for case in ("cold", "noop", "param", "status"):
            f = out[f"fpipe/{n}"][case]
            print(f"{n:5d} stages {case:6s}: fpipe {f:.3f} s | dvc {out[f'dvc/{n}'][case] / f:6.1f}x | snakemake {out[f'snakemake/{n}'][case] / f:6.1f}x")
    f = out["fpipe/tree"]["status"]
    print(f"10,000-file status: fpipe {f:.3f} s | dvc {out['dvc/tree']['status'] / f:6.1f}x | snakemake {out['snakemake/tree']['status'] / f:6.1f}x")
    if a.json:
        json.dump(out, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
