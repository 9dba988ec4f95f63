#!/usr/bin/env python3
"""Dispatch overhead of `fpipe run --executor slurm` per stage, on a real Slurm cluster.

    python3 benches/slurm_dispatch.py --fpipe target/release/fpipe [--snakemake-venv DIR]

Starts a private one-node cluster with tests/slurm/cluster.sh (as root; stopped by pid at the
end) unless SLURM_CONF names a running one. Measures:

- Slurm's own submit-to-start: a trivial batch script that writes `date +%s.%N` as its first
  command, submitted with plain `sbatch` one at a time; start minus the moment before sbatch.
- the same shell DAGs run by `fpipe run -j 16` (local) and `fpipe run --executor slurm`, fresh
  cache each time: a chain (each stage reads the one before, so the critical path is every
  stage) and the fan-out-3 tree of benches/engine_peers.py;
- Snakemake with `snakemake-executor-plugin-slurm` on the same DAGs, when DIR holds a venv with
  both installed.

Per stage of the critical path, the added latency is (slurm wall - local wall) / depth.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import engine_peers  # noqa: E402


def chain_fpipe(d, n):
    lines = ["fpipe: 1", "name: chain", "stages:"]
    for i in range(n):
        if i == 0:
            lines.append(f"  s{i}:\n    uses: shell\n    with: {{run: \"echo s{i} > out.txt\", outputs: [out.txt]}}")
        else:
            lines.append(
                f"  s{i}:\n    uses: shell\n    inputs: {{x: s{i-1}}}\n"
                f"    with: {{run: \"cat in/x/out.txt > out.txt; echo s{i} >> out.txt\", outputs: [out.txt]}}"
            )
    open(os.path.join(d, "pipeline.yaml"), "w").write("\n".join(lines) + "\n")


def chain_snakemake(d, n):
    rules = ["rule all:", f"    input: 'out/s{n-1}.txt'", ""]
    for i in range(n):
        if i == 0:
            rules.append(f"rule s{i}:\n    output: 'out/s{i}.txt'\n    shell: 'echo s{i} > {{output}}'\n")
        else:
            rules.append(
                f"rule s{i}:\n    input: 'out/s{i-1}.txt'\n    output: 'out/s{i}.txt'\n"
                f"    shell: 'cat {{input}} > {{output}}; echo s{i} >> {{output}}'\n"
            )
    open(os.path.join(d, "Snakefile"), "w").write("\n".join(rules))


def tree_depth(n):
    depth = {}
    for i in range(n):
        p = engine_peers.parent(i, n)
        depth[i] = 1 if p is None else depth[p] + 1
    return max(depth.values())


def timed(cmd, cwd, env, fatal=True):
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        msg = f"{' '.join(cmd)} failed in {cwd}:\n{r.stdout[-3000:]}"
        if fatal:
            raise SystemExit(msg)
        print(msg, flush=True)
        return None, r.stdout
    return dt, r.stdout


def submit_to_start(env, work, k=15):
    out = []
    for i in range(k):
        stamp = os.path.join(work, f"start-{i}")
        script = os.path.join(work, f"j{i}.sh")
        open(script, "w").write(f"#!/bin/sh\ndate +%s.%N > {stamp}\n")
        t0 = time.time()
        subprocess.run(["sbatch", "-Q", "-o", "/dev/null", script], env=env, check=True)
        while not os.path.exists(stamp) or os.path.getsize(stamp) == 0:
            time.sleep(0.005)
        out.append(float(open(stamp).read()) - t0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fpipe", required=True)
    ap.add_argument("--snakemake-venv")
    ap.add_argument("--sizes", default="10,100")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", default="chain,tree")
    ap.add_argument("--modes", default="local,slurm,snakemake")
    a = ap.parse_args()
    fpipe = os.path.abspath(a.fpipe)
    env = dict(os.environ)
    work = tempfile.mkdtemp(prefix="fpipe-slurm-bench-", dir="/var/tmp")
    pids = []
    if "SLURM_CONF" not in env:
        cdir = os.path.join(work, "cluster")
        subprocess.run(["sh", os.path.join(HERE, "..", "tests", "slurm", "cluster.sh"), cdir], check=True)
        env["SLURM_CONF"] = os.path.join(cdir, "slurm.conf")
        pids = open(os.path.join(cdir, "pids")).read().split()
    # Snakemake's jobs call srun, which does not find SLURM_CONF inside the job: point the
    # default location at the private cluster while the benchmark runs (only when free).
    linked = []
    if a.snakemake_venv and not os.path.exists("/etc/slurm/slurm.conf"):
        os.makedirs("/etc/slurm", exist_ok=True)
        for f in ("slurm.conf", "gres.conf"):
            os.symlink(os.path.join(os.path.dirname(env["SLURM_CONF"]), f), f"/etc/slurm/{f}")
            linked.append(f"/etc/slurm/{f}")
    try:
        s2s = submit_to_start(env, work)
        med_s2s = statistics.median(s2s)
        print(f"Slurm submit-to-start (plain sbatch, {len(s2s)} jobs): median {med_s2s*1000:.0f} ms, "
              f"min {min(s2s)*1000:.0f}, max {max(s2s)*1000:.0f}")
        for shape in a.shapes.split(","):
            for n in [int(x) for x in a.sizes.split(",")]:
                depth = n if shape == "chain" else tree_depth(n)
                res = {}
                for mode in a.modes.split(","):
                    if mode == "snakemake" and (not a.snakemake_venv or (shape == "chain" and n > 10)):
                        continue  # a 100-stage chain takes Snakemake minutes (status checks every second at best)
                    times = []
                    for rep in range(a.reps if n <= 10 else 1):
                        d = os.path.join(work, f"{shape}-{n}-{mode}-{rep}")
                        os.makedirs(d)
                        if mode == "snakemake":
                            (chain_snakemake if shape == "chain" else engine_peers.write_snakemake)(d, n)
                            snake = os.path.join(a.snakemake_venv, "bin", "snakemake")
                            # No accounting here: status from squeue; the shortest status
                            # intervals it accepts (its defaults wait 40 s, then 10 s between checks).
                            cmd = [snake, "all", "--executor", "slurm", "--jobs", "200", "--latency-wait", "0",
                                   "--slurm-status-command", "squeue", "--slurm-no-account",
                                   "--slurm-init-seconds-before-status-checks", "1",
                                   "--seconds-between-status-checks", "1",
                                   "--default-resources", "slurm_partition=debug", "mem_mb=100", "runtime=10"]
                        else:
                            (chain_fpipe if shape == "chain" else engine_peers.write_fpipe)(d, n)
                            cmd = [fpipe, "run", "pipeline.yaml"]
                            cmd += ["-j", "16"] if mode == "local" else ["--executor", "slurm"]
                        dt, _ = timed(cmd, d, env, fatal=mode != "snakemake")
                        if dt is None:
                            break
                        times.append(dt)
                    if times:
                        res[mode] = statistics.median(times)
                line = f"{shape:5} {n:4} stages, depth {depth:3}: local {res.get('local', 0):.2f} s"
                if "slurm" in res:
                    added = (res["slurm"] - res.get("local", 0)) / depth
                    line += (f", slurm {res['slurm']:.2f} s, added per stage of the critical path "
                             f"{added*1000:.0f} ms (goal <= {med_s2s*1000:.0f} + 100 ms)")
                if "snakemake" in res:
                    sadded = (res["snakemake"] - res.get("local", 0)) / depth
                    line += f"; snakemake {res['snakemake']:.2f} s ({sadded*1000:.0f} ms per stage)"
                print(line, flush=True)
    finally:
        for f in linked:
            os.remove(f)
        for p in pids:
            try:
                os.kill(int(p), 15)
            except (ProcessLookupError, ValueError):
                pass
        time.sleep(1)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
