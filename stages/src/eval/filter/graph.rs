//! The quality graph of one identity and semi-synchronous label propagation, step for step
//! networkx's `label_propagation_communities` (Cordasco and Gargano 2010).
//!
//! networkx's algorithm, which [`label_propagation`] reproduces:
//!
//! 1. colour the graph greedily, `largest_first` (nodes by degree, highest first, ties in
//!    node order; each takes the smallest colour no coloured neighbour has);
//! 2. give every node its own index as label;
//! 3. until every node with neighbours holds one of the most frequent labels among its
//!    neighbours, update the nodes colour by colour (0, 1, ...): a node takes the most
//!    frequent neighbour label; on a tie it keeps its own label if that is among the tied
//!    ones, else it takes the largest tied label ("Prec-Max").
//!
//! Nodes of one colour are never adjacent, so the order within a colour does not change the
//! result: the outcome is deterministic.

use super::FilterError;

/// Rounds of label propagation before giving up. The algorithm converges in far fewer on
/// every graph tried; the bound only turns a pathological case into an error, not a hang.
pub const MAX_ROUNDS: usize = 10_000;

/// Undirected simple graph on nodes `0..n` as sorted adjacency lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Graph {
    adj: Vec<Vec<usize>>,
}

impl Graph {
    /// `n` nodes and no edges.
    pub fn new(n: usize) -> Graph {
        Graph {
            adj: vec![Vec::new(); n],
        }
    }

    /// `n` nodes and the given edges. Repeated edges count once (as in `networkx.Graph`);
    /// a node index out of range or a self-loop is an error.
    pub fn from_edges(n: usize, edges: &[(usize, usize)]) -> Result<Graph, FilterError> {
        let mut g = Graph::new(n);
        for &(a, b) in edges {
            if a >= n || b >= n {
                return Err(FilterError::Invalid(format!(
                    "edge ({a}, {b}): node out of range ({n} nodes)"
                )));
            }
            if a == b {
                return Err(FilterError::Invalid(format!("edge ({a}, {a}): self-loop")));
            }
            g.adj[a].push(b);
            g.adj[b].push(a);
        }
        for l in &mut g.adj {
            l.sort_unstable();
            l.dedup();
        }
        Ok(g)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.adj.len()
    }
    /// True without nodes.
    pub fn is_empty(&self) -> bool {
        self.adj.is_empty()
    }
    /// Neighbours of `v`, ascending.
    pub fn neighbours(&self, v: usize) -> &[usize] {
        &self.adj[v]
    }
    /// Number of edges.
    pub fn edges(&self) -> usize {
        self.adj.iter().map(Vec::len).sum::<usize>() / 2
    }
}

/// Cosine similarity of two vectors in `f64` (0 when either is all zeros, as scikit-learn's
/// `normalize` leaves a zero vector zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// The quality graph of one identity (docs/methods.md section 7): rows of `emb` (`dim` wide) are
/// nodes; `i` and `j` are joined iff `cos(e_i, e_j) >= min(q_i, q_j) - offset`. A sharp,
/// high-quality pair must agree closely; a blurry image is joined more readily.
pub fn quality_graph(emb: &[f32], dim: usize, quality: &[f32], offset: f64) -> Graph {
    let n = quality.len();
    let mut g = Graph::new(n);
    for i in 0..n {
        let ei = &emb[i * dim..(i + 1) * dim];
        for j in i + 1..n {
            let t = (quality[i].min(quality[j]) as f64) - offset;
            if cosine(ei, &emb[j * dim..(j + 1) * dim]) >= t {
                g.adj[i].push(j);
                g.adj[j].push(i);
            }
        }
    }
    g
}

/// networkx's `greedy_color(G, strategy="largest_first")`: colour per node.
pub fn greedy_colour(g: &Graph) -> Vec<usize> {
    let n = g.len();
    let mut order: Vec<usize> = (0..n).collect();
    // Stable sort: equal degrees stay in node order, as Python's `sorted(reverse=True)`.
    order.sort_by(|&a, &b| g.adj[b].len().cmp(&g.adj[a].len()));
    let mut colour = vec![usize::MAX; n];
    let mut used = Vec::new();
    for &u in &order {
        used.clear();
        used.extend(
            g.adj[u]
                .iter()
                .map(|&v| colour[v])
                .filter(|&c| c != usize::MAX),
        );
        used.sort_unstable();
        used.dedup();
        // Smallest colour not in the sorted, deduplicated list.
        let c = used
            .iter()
            .enumerate()
            .find(|&(k, &c)| k != c)
            .map_or(used.len(), |(k, _)| k);
        colour[u] = c;
    }
    colour
}

/// The most frequent labels among `v`'s neighbours (ascending) into `out`.
fn most_frequent(
    g: &Graph,
    v: usize,
    labels: &[usize],
    buf: &mut Vec<usize>,
    out: &mut Vec<usize>,
) {
    buf.clear();
    buf.extend(g.adj[v].iter().map(|&u| labels[u]));
    buf.sort_unstable();
    out.clear();
    let mut best = 0;
    let mut k = 0;
    while k < buf.len() {
        let l = buf[k];
        let mut e = k;
        while e < buf.len() && buf[e] == l {
            e += 1;
        }
        let f = e - k;
        if f > best {
            best = f;
            out.clear();
        }
        if f == best {
            out.push(l);
        }
        k = e;
    }
}

/// Final label per node of networkx's `label_propagation_communities` (labels are node
/// indices; nodes sharing a label form a community). Errors after [`MAX_ROUNDS`] rounds.
pub fn label_propagation(g: &Graph) -> Result<Vec<usize>, FilterError> {
    let n = g.len();
    let colour = greedy_colour(g);
    let ncol = colour.iter().map(|&c| c + 1).max().unwrap_or(0);
    let mut by_colour = vec![Vec::new(); ncol];
    for (v, &c) in colour.iter().enumerate() {
        by_colour[c].push(v);
    }
    let mut labels: Vec<usize> = (0..n).collect();
    let (mut buf, mut high) = (Vec::new(), Vec::new());
    for _ in 0..MAX_ROUNDS {
        let complete = (0..n).all(|v| {
            if g.adj[v].is_empty() {
                return true;
            }
            most_frequent(g, v, &labels, &mut buf, &mut high);
            high.binary_search(&labels[v]).is_ok()
        });
        if complete {
            return Ok(labels);
        }
        for nodes in &by_colour {
            for &v in nodes {
                if g.adj[v].is_empty() {
                    continue;
                }
                most_frequent(g, v, &labels, &mut buf, &mut high);
                if high.len() == 1 {
                    labels[v] = high[0];
                } else if high.binary_search(&labels[v]).is_err() {
                    // Prec-Max: `high` is ascending, so its last is the largest.
                    labels[v] = high[high.len() - 1];
                }
            }
        }
    }
    Err(FilterError::Invalid(format!(
        "label propagation did not converge in {MAX_ROUNDS} rounds ({n} nodes, {} edges)",
        g.edges()
    )))
}

/// Communities of `g` by [`label_propagation`], numbered 0, 1, ... in order of their lowest
/// node; isolated nodes are noise, `-1`.
pub fn communities(g: &Graph) -> Result<Vec<i64>, FilterError> {
    let labels = label_propagation(g)?;
    Ok(renumber(&labels, |v| g.adj[v].is_empty()))
}

/// Renumbers arbitrary cluster labels 0, 1, ... in order of each cluster's lowest node;
/// nodes where `noise(v)` is true get `-1`.
pub(crate) fn renumber(labels: &[usize], noise: impl Fn(usize) -> bool) -> Vec<i64> {
    let mut map = std::collections::HashMap::new();
    labels
        .iter()
        .enumerate()
        .map(|(v, l)| {
            if noise(v) {
                return -1;
            }
            let next = map.len() as i64;
            *map.entry(*l).or_insert(next)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_triangles_joined_by_a_bridge_are_two_communities() {
        // 0-1-2 triangle, 3-4-5 triangle, bridge 2-3, node 6 isolated.
        let g = Graph::from_edges(7, &[(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (2, 3)])
            .unwrap();
        assert_eq!(communities(&g).unwrap(), vec![0, 0, 0, 1, 1, 1, -1]);
    }

    #[test]
    fn greedy_colouring_is_proper_and_starts_at_the_highest_degree() {
        // Star centred on 3 plus edge 0-1.
        let g = Graph::from_edges(5, &[(3, 0), (3, 1), (3, 2), (3, 4), (0, 1)]).unwrap();
        let c = greedy_colour(&g);
        assert_eq!(c[3], 0);
        for v in 0..5 {
            for &u in g.neighbours(v) {
                assert_ne!(c[u], c[v]);
            }
        }
        // 0 and 1 have degree 2 and come first among the rest: colours 1 and 2.
        assert_eq!((c[0], c[1], c[2], c[4]), (1, 2, 1, 1));
    }

    #[test]
    fn bad_edges_are_errors() {
        assert!(Graph::from_edges(2, &[(0, 2)]).is_err());
        assert!(Graph::from_edges(2, &[(1, 1)]).is_err());
        assert_eq!(Graph::from_edges(2, &[(0, 1), (1, 0)]).unwrap().edges(), 1);
    }
}
