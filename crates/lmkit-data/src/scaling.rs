//! The data-constrained scaling law: Muennighoff et al., "Scaling Data-Constrained Language
//! Models" (NeurIPS 2023, arXiv 2305.16264; reference code huggingface/datablations, its
//! README's `scaling_law` and `optimal_allocation`).
//!
//! For `N` parameters trained on `D` tokens of which `U_D` are unique:
//!
//! ```text
//! R_D = max(D / U_D − 1, 0)                          repetitions of the data (epochs − 1)
//! D'  = U_D + U_D · R_D* · (1 − exp(−R_D / R_D*))    effective data
//! G   = (α A / (β B))^(1/(α+β))
//! U_N = min(N, G · (U_D · G)^(β/α))                  the compute-optimal size for U_D tokens
//! R_N = max(N / U_N − 1, 0)                          excess parameters, in multiples of U_N
//! N'  = U_N + U_N · R_N* · (1 − exp(−R_N / R_N*))    effective parameters
//! L   = E + A / N'^α + B / D'^β
//! ```
//!
//! A repeated token is worth `exp(−R_D/R_D*)` of a new one: with the fitted `R_D* ≈ 15.4`, four
//! epochs are worth 3.73 epochs of unique data and the value of more repetition decays to a
//! ceiling of `1 + R_D*` epochs. Excess parameters decay faster (`R_N* ≈ 5.3`).
//!
//! The default constants ([`Law::published`]) are the reference code's: `a, b, e, α, β,
//! R_D*, R_N* = 6.255414, 7.3049974, 0.6254804, 0.3526596, 0.3526596, 15.387756, 5.309743` with
//! `A = eᵃ, B = eᵇ, E = eᵉ` (datablations README; `a…β` are the authors' refit of Chinchilla's
//! C4 isoFLOP points with `α = β`, `R_D*` and `R_N*` their fit to the paper's runs, reported
//! in the paper as 15.4 and 5.3).
//!
//! The compute-optimal allocation ([`Law::optimal_allocation`]) is the reference's search: from
//! the unconstrained optimum `N₀ = G (C/6)^(β/(α+β))`, `D₀ = (C/6)^(α/(α+β)) / G`, try
//! `(N₀/i, D₀·i)` and `(N₀·i, D₀/i)` for 500 values of `i` evenly spaced in `[1.0001, 3]`, with
//! `U = min(U_budget, D)` and `C = 6ND` fixed, and keep the lowest loss.
//!
//! Fitting ([`fit`]) minimizes, as the reference does, the Huber loss (δ = 10⁻³) between
//! `log L_observed` and `log(E + A/N'^α + B/D'^β)` (computed as a log-sum-exp of `a − α log N'`,
//! `b − β log D'`, `e`), from a grid of starting points.
//!
//! Deviations: the reference fits with L-BFGS (torch); this uses Nelder–Mead from the best
//! grid points, so fitted constants agree to the optimizer's tolerance, not bit for bit. When
//! every constant is fitted, `U_N` is recomputed from the current `A, B, α, β` at each
//! evaluation (the reference fixed them first, then fitted `R_D*, R_N*` alone, which is
//! [`FitWhat::Decay`] here).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The law's constants.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Law {
    pub a: f64,
    pub b: f64,
    pub e: f64,
    pub alpha: f64,
    pub beta: f64,
    pub rd_star: f64,
    pub rn_star: f64,
}

/// A model size and token count for a compute budget, and its predicted loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Allocation {
    pub params: f64,
    pub tokens: f64,
    /// `tokens / unique tokens`.
    pub epochs: f64,
    pub loss: f64,
}

impl Law {
    /// The constants of the reference code (see the module doc).
    pub fn published() -> Self {
        Self::from_logs([
            6.255414, 7.3049974, 0.6254804, 0.3526596, 0.3526596, 15.387756, 5.309743,
        ])
    }

    /// From `[ln A, ln B, ln E, α, β, R_D*, R_N*]`, the parametrization the fit works in.
    pub fn from_logs(p: [f64; 7]) -> Self {
        Self {
            a: p[0].exp(),
            b: p[1].exp(),
            e: p[2].exp(),
            alpha: p[3],
            beta: p[4],
            rd_star: p[5],
            rn_star: p[6],
        }
    }

    /// `[ln A, ln B, ln E, α, β, R_D*, R_N*]`.
    pub fn to_logs(&self) -> [f64; 7] {
        [
            self.a.ln(),
            self.b.ln(),
            self.e.ln(),
            self.alpha,
            self.beta,
            self.rd_star,
            self.rn_star,
        ]
    }

    /// `G = (α A / (β B))^(1/(α+β))`.
    pub fn g(&self) -> f64 {
        ((self.alpha * self.a) / (self.beta * self.b)).powf(1.0 / (self.alpha + self.beta))
    }

    /// The compute-optimal parameter count for `tokens` tokens (`D_to_N`).
    pub fn optimal_params(&self, tokens: f64) -> f64 {
        let g = self.g();
        (tokens * g).powf(self.beta / self.alpha) * g
    }

    /// The unconstrained compute-optimal `(N, D)` for `flops` (`C = 6ND`).
    pub fn chinchilla_optimum(&self, flops: f64) -> (f64, f64) {
        let (g, s) = (self.g(), self.alpha + self.beta);
        let c = flops / 6.0;
        (g * c.powf(self.beta / s), c.powf(self.alpha / s) / g)
    }

    /// `D'` for `tokens` tokens drawn from `unique` unique ones (at most `tokens` of them can
    /// be seen).
    pub fn effective_data(&self, tokens: f64, unique: f64) -> f64 {
        let unique = unique.min(tokens);
        let r = (tokens / unique - 1.0).max(0.0);
        unique + unique * decayed(r, self.rd_star)
    }

    /// `N'` for `params` parameters trained on `unique` unique tokens.
    pub fn effective_params(&self, params: f64, unique: f64) -> f64 {
        let un = params.min(self.optimal_params(unique));
        let r = (params / un - 1.0).max(0.0);
        un + un * decayed(r, self.rn_star)
    }

    /// The predicted loss of `params` parameters trained on `tokens` tokens, `unique` of them
    /// unique (`unique` above `tokens` counts as `tokens`: the rest is never seen).
    pub fn loss(&self, params: f64, tokens: f64, unique: f64) -> f64 {
        let unique = unique.min(tokens);
        let n = self.effective_params(params, unique);
        let d = self.effective_data(tokens, unique);
        self.e + self.a / n.powf(self.alpha) + self.b / d.powf(self.beta)
    }

    /// The lowest-loss `(N, D)` with `6ND = flops` when at most `unique` tokens are unique
    /// (the reference's search, see the module doc).
    pub fn optimal_allocation(&self, flops: f64, unique: f64) -> Result<Allocation> {
        positive("flops", flops)?;
        positive("unique tokens", unique)?;
        let (n0, d0) = self.chinchilla_optimum(flops);
        let mut best: Option<Allocation> = None;
        for i in linspace(1.0001, 3.0, 500) {
            for (n, d) in [(n0 / i, d0 * i), (n0 * i, d0 / i)] {
                let loss = self.loss(n, d, unique.min(d));
                if best.is_none_or(|b| loss < b.loss) {
                    best = Some(Allocation {
                        params: n,
                        tokens: d,
                        epochs: d / unique,
                        loss,
                    });
                }
            }
        }
        best.ok_or_else(|| Error::Invalid {
            what: "flops".into(),
            why: "no allocation".into(),
        })
    }
}

/// `R* · (1 − exp(−R / R*))`: `R` repetitions decayed with constant `R*` (`R` as `R* → 0⁺`
/// gives 0; a non-positive `R*` is treated as that limit).
fn decayed(r: f64, r_star: f64) -> f64 {
    if r_star <= 0.0 {
        return 0.0;
    }
    r_star * (1.0 - (-r / r_star).exp())
}

/// numpy's `linspace(start, stop, n)`: `start + k·step`, the last value exactly `stop`.
fn linspace(start: f64, stop: f64, n: usize) -> impl Iterator<Item = f64> {
    let step = (stop - start) / (n.max(2) - 1) as f64;
    (0..n).map(move |k| {
        if k + 1 == n {
            stop
        } else {
            start + k as f64 * step
        }
    })
}

fn positive(what: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::Invalid {
            what: what.into(),
            why: format!("must be a positive number, got {v}"),
        })
    }
}

/// One training run: parameters, tokens seen, unique tokens, final loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Run {
    #[serde(rename = "N")]
    pub params: f64,
    #[serde(rename = "D")]
    pub tokens: f64,
    #[serde(rename = "U")]
    pub unique: f64,
    pub loss: f64,
}

impl Run {
    /// Checks the fields are positive and finite.
    pub fn check(&self) -> Result<()> {
        positive("N", self.params)?;
        positive("D", self.tokens)?;
        positive("U", self.unique)?;
        positive("loss", self.loss)
    }
}

/// Which constants a fit moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitWhat {
    /// Only `R_D*` and `R_N*`; `A, B, E, α, β` stay as given (the paper's second fit).
    Decay,
    /// All seven.
    All,
}

/// A fitted law and how well it fits.
#[derive(Debug, Clone, Serialize)]
pub struct Fit {
    pub law: Law,
    /// The objective at the optimum: summed Huber loss of the log-loss residuals.
    pub objective: f64,
    /// R² of the predicted against the observed losses.
    pub r2: f64,
}

/// Huber's δ, as the reference.
const HUBER_DELTA: f64 = 1e-3;

fn huber(r: f64) -> f64 {
    let a = r.abs();
    if a <= HUBER_DELTA {
        0.5 * r * r
    } else {
        HUBER_DELTA * (a - 0.5 * HUBER_DELTA)
    }
}

/// `log L` predicted for a run, as a log-sum-exp (stable for any constants).
fn log_loss(p: &[f64; 7], run: &Run) -> f64 {
    let law = Law::from_logs(*p);
    let n = law.effective_params(run.params, run.unique.min(run.tokens));
    let d = law.effective_data(run.tokens, run.unique);
    let terms = [p[0] - p[3] * n.ln(), p[1] - p[4] * d.ln(), p[2]];
    let m = terms.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    m + terms.iter().map(|t| (t - m).exp()).sum::<f64>().ln()
}

fn objective(p: &[f64; 7], runs: &[Run]) -> f64 {
    let v: f64 = runs
        .iter()
        .map(|r| huber(r.loss.ln() - log_loss(p, r)))
        .sum();
    if v.is_finite() {
        v
    } else {
        f64::INFINITY
    }
}

/// Fits the law to `runs` (at least as many runs as constants fitted), starting from `start`
/// for the constants that stay fixed and from a grid for the others.
pub fn fit(runs: &[Run], start: &Law, what: FitWhat) -> Result<Fit> {
    let need = match what {
        FitWhat::Decay => 2,
        FitWhat::All => 7,
    };
    if runs.len() < need {
        return Err(Error::Invalid {
            what: "runs".into(),
            why: format!("{} runs cannot fit {need} constants", runs.len()),
        });
    }
    for r in runs {
        r.check()?;
    }
    let base = start.to_logs();
    let free: Vec<usize> = match what {
        FitWhat::Decay => vec![5, 6],
        FitWhat::All => (0..7).collect(),
    };
    // Starting points: the reference's grids (R* over linspace(0, 20, 4), without the 0;
    // for all constants a, b over linspace(0, 25, 5), e over linspace(−1, 1, 4) and α = β
    // over linspace(0, 2, 4), without the 0), best first.
    let mut starts: Vec<[f64; 7]> = Vec::new();
    let stars: Vec<f64> = linspace(0.0, 20.0, 4).skip(1).collect();
    let mut grid = vec![base];
    if what == FitWhat::All {
        grid.clear();
        for a in linspace(0.0, 25.0, 5) {
            for b in linspace(0.0, 25.0, 5) {
                for e in linspace(-1.0, 1.0, 4) {
                    for al in linspace(0.0, 2.0, 4).skip(1) {
                        grid.push([a, b, e, al, al, base[5], base[6]]);
                    }
                }
            }
        }
    }
    for g in &grid {
        for &rd in &stars {
            for &rn in &stars {
                let mut p = *g;
                (p[5], p[6]) = (rd, rn);
                starts.push(p);
            }
        }
    }
    starts.sort_by(|x, y| objective(x, runs).total_cmp(&objective(y, runs)));
    let mut best: Option<([f64; 7], f64)> = None;
    for s in starts.iter().take(8) {
        let mut p = *s;
        // Two rounds: the second restarts the simplex around the first's optimum.
        for _ in 0..2 {
            p = nelder_mead(&p, &free, |q| objective(q, runs), 4000);
        }
        let v = objective(&p, runs);
        if best.is_none_or(|(_, b)| v < b) {
            best = Some((p, v));
        }
    }
    let (p, v) = best.ok_or_else(|| Error::Invalid {
        what: "runs".into(),
        why: "no starting point".into(),
    })?;
    let law = Law::from_logs(p);
    let mean = runs.iter().map(|r| r.loss).sum::<f64>() / runs.len() as f64;
    let (mut ss_res, mut ss_tot) = (0.0, 0.0);
    for r in runs {
        ss_res += (r.loss - law.loss(r.params, r.tokens, r.unique)).powi(2);
        ss_tot += (r.loss - mean).powi(2);
    }
    let r2 = if ss_tot > 0.0 {
        1.0 - ss_res / ss_tot
    } else {
        1.0
    };
    Ok(Fit {
        law,
        objective: v,
        r2,
    })
}

/// Nelder–Mead over the coordinates `free` of `x0` (reflection 1, expansion 2, contraction ½,
/// shrink ½), at most `iters` iterations.
fn nelder_mead(
    x0: &[f64; 7],
    free: &[usize],
    f: impl Fn(&[f64; 7]) -> f64,
    iters: usize,
) -> [f64; 7] {
    let k = free.len();
    let point = |y: &[f64]| {
        let mut p = *x0;
        for (&i, &v) in free.iter().zip(y) {
            p[i] = v;
        }
        p
    };
    let start: Vec<f64> = free.iter().map(|&i| x0[i]).collect();
    let mut simplex: Vec<(Vec<f64>, f64)> = Vec::with_capacity(k + 1);
    simplex.push((start.clone(), f(&point(&start))));
    for j in 0..k {
        let mut y = start.clone();
        y[j] += 0.1 * y[j].abs() + 0.05;
        let v = f(&point(&y));
        simplex.push((y, v));
    }
    for _ in 0..iters {
        simplex.sort_by(|a, b| a.1.total_cmp(&b.1));
        let (lo, hi) = (simplex[0].1, simplex[k].1);
        if (hi - lo).abs() <= 1e-15 * (1.0 + lo.abs()) {
            break;
        }
        let centroid: Vec<f64> = (0..k)
            .map(|j| simplex[..k].iter().map(|s| s.0[j]).sum::<f64>() / k as f64)
            .collect();
        let along = |t: f64| -> Vec<f64> {
            centroid
                .iter()
                .zip(&simplex[k].0)
                .map(|(c, w)| c + t * (c - w))
                .collect()
        };
        let xr = along(1.0);
        let fr = f(&point(&xr));
        if fr < simplex[0].1 {
            let xe = along(2.0);
            let fe = f(&point(&xe));
            simplex[k] = if fe < fr { (xe, fe) } else { (xr, fr) };
        } else if fr < simplex[k - 1].1 {
            simplex[k] = (xr, fr);
        } else {
            let xc = if fr < simplex[k].1 {
                along(0.5)
            } else {
                along(-0.5)
            };
            let fc = f(&point(&xc));
            if fc < simplex[k].1.min(fr) {
                simplex[k] = (xc, fc);
            } else {
                let best = simplex[0].0.clone();
                for s in simplex.iter_mut().skip(1) {
                    s.0 = best
                        .iter()
                        .zip(&s.0)
                        .map(|(b, x)| b + 0.5 * (x - b))
                        .collect();
                    s.1 = f(&point(&s.0));
                }
            }
        }
    }
    simplex.sort_by(|a, b| a.1.total_cmp(&b.1));
    point(&simplex[0].0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference README's printed numbers, to their last digit (relative 1e-12).
    #[test]
    fn reproduces_the_reference_numbers() -> Result<()> {
        let law = Law::published();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
        let l1 = law.loss(6.34e9, 242e9, 25e9);
        assert!(close(l1, 2.2256440889984477), "{l1}");
        let l2 = law.loss(8.67e9, 178e9, 25e9);
        assert!(close(l2, 2.2269634075087867), "{l2}");
        let a = law.optimal_allocation(1e22, 25e9)?;
        assert!(close(a.tokens, 237336955477.55075), "{a:?}");
        assert!(close(a.epochs, 9.49347821910203), "{a:?}");
        assert!(close(a.params, 7022364735.879969), "{a:?}");
        // Effective data: 4 epochs are worth 3.7257 epochs of unique data, 40 are worth 15.17,
        // and no amount of repetition passes 1 + R_D*.
        let u = 1e9;
        assert!((law.effective_data(4.0 * u, u) / u - 3.725673).abs() < 1e-6);
        assert!((law.effective_data(40.0 * u, u) / u - 15.167465).abs() < 1e-6);
        assert!(law.effective_data(1e6 * u, u) / u <= 1.0 + law.rd_star);
        assert!(law.optimal_allocation(-1.0, u).is_err());
        // More unique tokens than seen ones: only the seen ones count.
        assert_eq!(law.loss(1e9, 2e10, 1e12), law.loss(1e9, 2e10, 2e10));
        Ok(())
    }

    /// Synthetic runs from a known law with 0.2% noise: the fit finds the constants back.
    #[test]
    fn fit_recovers_known_constants() -> Result<()> {
        let truth = Law {
            rd_star: 9.0,
            rn_star: 3.0,
            ..Law::published()
        };
        let mut runs = Vec::new();
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        for &n in &[1e8, 4e8, 1.6e9, 6.4e9] {
            for &u in &[1e9, 4e9] {
                for &epochs in &[1.0, 2.0, 4.0, 8.0, 16.0, 40.0] {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    let noise = ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.004;
                    let d = u * epochs;
                    runs.push(Run {
                        params: n,
                        tokens: d,
                        unique: u,
                        loss: truth.loss(n, d, u) * (1.0 + noise),
                    });
                }
            }
        }
        let f = fit(&runs, &Law::published(), FitWhat::Decay)?;
        assert!((f.law.rd_star - 9.0).abs() < 0.9, "{:?}", f.law);
        assert!((f.law.rn_star - 3.0).abs() < 0.6, "{:?}", f.law);
        assert!(f.r2 > 0.99, "{}", f.r2);
        let all = fit(&runs, &Law::published(), FitWhat::All)?;
        assert!(all.r2 > 0.99, "{}", all.r2);
        for r in &runs {
            let want = truth.loss(r.params, r.tokens, r.unique);
            let got = all.law.loss(r.params, r.tokens, r.unique);
            assert!((got - want).abs() < 0.01 * want, "{got} vs {want}");
        }
        assert!(fit(&runs[..3], &Law::published(), FitWhat::All).is_err());
        Ok(())
    }
}
