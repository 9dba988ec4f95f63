//! DBSCAN with the cosine distance `1 - cos`, labelling points exactly as scikit-learn's
//! `DBSCAN(metric="cosine")`: the baseline the quality graph is compared with.

use super::graph::cosine;

/// Cluster per row of `emb` (`dim` wide): scikit-learn's labels. A point is a core point when
/// at least `min_samples` points (itself included) lie within distance `eps` (`<=`);
/// clusters are grown from core points in index order and numbered 0, 1, ... in that order;
/// a border point reachable from several clusters joins the first one grown; the rest is
/// noise, `-1`.
pub fn dbscan(emb: &[f32], dim: usize, eps: f64, min_samples: usize) -> Vec<i64> {
    let n = emb.len().checked_div(dim).unwrap_or(0);
    let row = |i: usize| &emb[i * dim..(i + 1) * dim];
    let mut hood: Vec<Vec<usize>> = vec![Vec::new(); n];
    for i in 0..n {
        hood[i].push(i);
        for j in i + 1..n {
            // scikit-learn clips the cosine distance into [0, 2].
            let d = (1.0 - cosine(row(i), row(j))).clamp(0.0, 2.0);
            if d <= eps {
                hood[i].push(j);
                hood[j].push(i);
            }
        }
    }
    let core: Vec<bool> = hood.iter().map(|h| h.len() >= min_samples).collect();
    let mut labels = vec![-1i64; n];
    let mut next = 0i64;
    let mut stack = Vec::new();
    for start in 0..n {
        if labels[start] != -1 || !core[start] {
            continue;
        }
        stack.push(start);
        while let Some(i) = stack.pop() {
            if labels[i] != -1 {
                continue;
            }
            labels[i] = next;
            if core[i] {
                stack.extend(hood[i].iter().copied().filter(|&v| labels[v] == -1));
            }
        }
        next += 1;
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn border_point_joins_the_first_cluster_and_outlier_is_noise() {
        // Angles in degrees on the unit circle; eps 0.3 is about 45.57 degrees.
        let pts: Vec<f32> = [0.0f32, 10.0, 50.0, 90.0, 100.0, 200.0]
            .iter()
            .flat_map(|d| [d.to_radians().cos(), d.to_radians().sin()])
            .collect();
        // min_samples 3: 0 (with 10) and 50? 0-50 is 50 degrees > 45.57: not neighbours.
        // 10: {0, 10, 50} core; 50: {10, 50, 90} core; 90: {50, 90, 100} core.
        let l = dbscan(&pts, 2, 0.3, 3);
        assert_eq!(l, vec![0, 0, 0, 0, 0, -1]);
        // min_samples 4: no core point anywhere.
        assert_eq!(dbscan(&pts, 2, 0.3, 4), vec![-1; 6]);
    }
}
