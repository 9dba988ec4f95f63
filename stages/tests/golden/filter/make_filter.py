#!/usr/bin/env python3
"""Golden files for `fpipe_stages::eval::filter` (tests/filter_golden.rs).

Run from this folder with numpy + scikit-learn + networkx: `python make_filter.py`.

- `graphs`: random graphs (G(n, p), planted partitions, a few isolated nodes) given as edge
  lists, with networkx's `label_propagation_communities`; a community is written as the
  number of its lowest node's position among communities ordered by lowest node, and an
  isolated node as -1.
- `points.f32` / `quality.f32`: 3 clumps of unit vectors (dim 8, float32) and a quality in
  0..1 per point; `quality_graph` holds the quality-graph edges
  (cos(e_i, e_j) >= min(q_i, q_j) - offset, in float64) and their communities.
- `dbscan`: scikit-learn's `DBSCAN(eps, min_samples, metric="cosine")` labels on the points.
"""
import json

import networkx as nx
import numpy as np
from sklearn.cluster import DBSCAN

rng = np.random.default_rng(11)


def communities(G):
    out = [-1] * G.number_of_nodes()
    comms = sorted((sorted(c) for c in nx.community.label_propagation_communities(G)), key=lambda c: c[0])
    k = 0
    for c in comms:
        if len(c) == 1 and G.degree(c[0]) == 0:
            continue
        for v in c:
            out[v] = k
        k += 1
    return out


def graph_case(n, edges):
    G = nx.Graph()
    G.add_nodes_from(range(n))
    G.add_edges_from(edges)
    return {"n": n, "edges": [list(e) for e in G.edges()], "communities": communities(G)}


graphs = []
for n, p, seed in [(10, 0.3, 1), (25, 0.15, 2), (40, 0.08, 3), (60, 0.05, 4), (80, 0.1, 5), (120, 0.03, 6)]:
    G = nx.gnp_random_graph(n, p, seed=seed)
    graphs.append(graph_case(n, list(G.edges())))
for sizes, p_in, p_out, seed in [([10, 8, 6], 0.6, 0.05, 7), ([20, 15, 5, 3], 0.4, 0.02, 8), ([30, 30], 0.3, 0.05, 9)]:
    G = nx.random_partition_graph(sizes, p_in, p_out, seed=seed)
    # Shuffle node names so communities are not contiguous ranges.
    perm = rng.permutation(G.number_of_nodes())
    graphs.append(graph_case(G.number_of_nodes(), [(int(perm[a]), int(perm[b])) for a, b in G.edges()]))

dim = 8
centres = rng.normal(size=(3, dim))
pts = np.concatenate([centres[k] + s * rng.normal(size=(m, dim)) for k, m, s in [(0, 25, 0.35), (1, 15, 0.5), (2, 8, 0.8)]])
pts = np.concatenate([pts, rng.normal(size=(6, dim))])  # scattered outliers
pts = (pts / np.linalg.norm(pts, axis=1, keepdims=True)).astype(np.float32)
order = rng.permutation(len(pts))
pts = pts[order]
quality = rng.uniform(0.2, 1.0, size=len(pts)).astype(np.float32)
pts.tofile("points.f32")
quality.tofile("quality.f32")

p64 = pts.astype(np.float64)
p64 /= np.linalg.norm(p64, axis=1, keepdims=True)
cos = p64 @ p64.T
qgraphs = []
for offset in [0.1, 0.0, 0.3, -0.15]:
    n = len(pts)
    edges = [(i, j) for i in range(n) for j in range(i + 1, n)
             if cos[i, j] >= min(float(quality[i]), float(quality[j])) - offset]
    case = graph_case(n, edges)
    case["offset"] = offset
    qgraphs.append(case)

dbscan = []
for eps, ms in [(0.3, 2), (0.2, 3), (0.5, 5), (0.05, 2)]:
    labels = DBSCAN(eps=eps, min_samples=ms, metric="cosine").fit(pts.astype(np.float64)).labels_
    dbscan.append({"eps": eps, "min_samples": ms, "labels": [int(x) for x in labels]})

json.dump({"dim": dim, "graphs": graphs, "quality_graph": qgraphs, "dbscan": dbscan}, open("expected.json", "w"))
for g in graphs + qgraphs:
    print(g["n"], len(g["edges"]), "communities", max(g["communities"]) + 1, "noise", g["communities"].count(-1))
for d in dbscan:
    print("dbscan", d["eps"], d["min_samples"], "clusters", max(d["labels"]) + 1, "noise", d["labels"].count(-1))
