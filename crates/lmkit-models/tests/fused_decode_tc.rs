//! The tensor-core products of batched decoding (`dec_tgemv`, `dec_tgateup` in decode.cu,
//! `LMKIT_DECODE_TC=1`) on the CPU emulator, whose `mma.sync` has PTX's fragment layout: each
//! kernel against the product written out on the host (x rounded to the weights' type as the
//! kernels round it), then models' fused decoding against the reference path: bf16 weights,
//! and Q8_0/Q4_1/Q4_0 blocks (`dec_tqgemv`, `dec_tqgateup`). Every test of this binary runs
//! with `LMKIT_DECODE_TC=1`.

use lmkit_core::launch::{Arg, Launcher};
use lmkit_core::{DType, Device, GgmlDType, Tensor};
use lmkit_models::LlamaConfig;

mod fused_common;
use fused_common::{compare, compare_models, model, quantized_pair};

type Res = Result<(), Box<dyn std::error::Error>>;

fn vals(n: usize, k: f32, s: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 * k).sin() + 0.05) * s).collect()
}

/// `v` rounded to `dt` and back.
fn round(v: &[f32], dt: DType) -> Result<Vec<f32>, Box<dyn std::error::Error>> {
    let t = Tensor::new(v, &Device::Cpu)?.to_dtype(dt)?;
    Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// The products' inputs: x (b, k) f32 and the norm weight.
struct Input {
    x: Vec<f32>,
    nw: Vec<f32>,
    k: usize,
}

impl Input {
    fn new(b: usize, k: usize) -> Self {
        Input {
            x: vals(b * k, 0.71, 2.0),
            nw: vals(k, 0.37, 1.5),
            k,
        }
    }

    /// Row m as the kernels read it: (x ⊙ nw) rounded to `dt`, and the norm factor.
    fn row(
        &self,
        m: usize,
        norm: bool,
        dt: DType,
    ) -> Result<(Vec<f32>, f64), Box<dyn std::error::Error>> {
        let xr = &self.x[m * self.k..(m + 1) * self.k];
        let a: Vec<f32> = match norm {
            true => xr.iter().zip(&self.nw).map(|(x, w)| x * w).collect(),
            false => xr.to_vec(),
        };
        let ss: f64 = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / self.k as f64;
        let r = if norm {
            1.0 / (ss + EPS as f64).sqrt()
        } else {
            1.0
        };
        Ok((round(&a, dt)?, r))
    }
}

const EPS: f32 = 1e-5;

fn dot(w: &[f32], a: &[f32]) -> f64 {
    w.iter().zip(a).map(|(&p, &q)| p as f64 * q as f64).sum()
}

/// A kernel's `(16, n)` output against `want(sequence, row)` for the `b` sequences; the rows
/// past the batch must keep their sentinel 7.
fn check_tile(
    got: &[f32],
    n: usize,
    b: usize,
    what: &str,
    want: impl Fn(usize, usize) -> Result<f64, Box<dyn std::error::Error>>,
) -> Res {
    for m in 0..16 {
        for row in 0..n {
            let at = format!("{what}[{m}][{row}]");
            if m >= b {
                assert_eq!(got[m * n + row], 7.0, "{at} past the batch");
                continue;
            }
            let w = want(m, row)?;
            close(got[m * n + row], w, 1.0 + w.abs(), &at);
        }
    }
    Ok(())
}

fn close(got: f32, want: f64, scale: f64, what: &str) {
    assert!(
        ((got as f64) - want).abs() <= 1e-4 * scale + 1e-6,
        "{what}: {got} vs {want}"
    );
}

#[test]
fn stacked_products_match_the_host() -> Res {
    std::env::set_var("LMKIT_DECODE_TC", "1");
    let l = Launcher::Emu;
    let dev = Device::Cpu;
    // Three stacked matrices of 24, 16 and 8 rows; k of 3 chunks (one warp idle) and of 9.
    let rows = [24usize, 16, 8];
    let n: usize = rows.iter().sum();
    for (dt, sfx) in [(DType::BF16, "bf16")] {
        for (b, k, norm, extras) in [
            (2usize, 96usize, true, true),
            (5, 288, false, true),
            (16, 96, true, false),
        ] {
            let inp = Input::new(b, k);
            let mats: Vec<Tensor> = rows
                .iter()
                .enumerate()
                .map(|(i, &r)| {
                    Tensor::from_vec(vals(r * k, 0.13 + i as f32 * 0.07, 0.5), (r, k), &dev)?
                        .to_dtype(dt)
                })
                .collect::<Result<_, _>>()?;
            let wv: Vec<Vec<f32>> = mats
                .iter()
                .map(|m| m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
                .collect::<Result<_, _>>()?;
            let biases: Vec<Tensor> = rows
                .iter()
                .map(|&r| Tensor::from_vec(vals(r, 0.9, 0.3), r, &dev))
                .collect::<Result<_, _>>()?;
            let x = Tensor::from_vec(inp.x.clone(), (b, k), &dev)?;
            let nw = Tensor::from_vec(inp.nw.clone(), k, &dev)?;
            let res = Tensor::from_vec(vals(b * n, 0.23, 1.0), (b, n), &dev)?;
            // 16 rows of output: the ones past the batch must keep their sentinel.
            let y = Tensor::full(7f32, (16, n), &dev)?;
            let p =
                |t: &Tensor| -> Result<Arg, Box<dyn std::error::Error>> { Ok(Arg::Ptr(l.ptr(t)?)) };
            let mut args = Vec::new();
            for m in &mats {
                args.push(p(m)?);
            }
            for &r in &rows {
                args.push(Arg::int(r, "rows")?);
            }
            for bias in &biases {
                args.push(if extras { p(bias)? } else { Arg::Ptr(0) });
            }
            args.push(p(&x)?);
            args.push(if extras { p(&res)? } else { Arg::Ptr(0) });
            args.push(p(&y)?);
            args.push(Arg::int(k, "k")?);
            args.push(Arg::int(b, "b")?);
            args.push(if norm { p(&nw)? } else { Arg::Ptr(0) });
            args.push(Arg::F32(EPS));
            l.launch(
                &format!("dec_tgemv_{sfx}"),
                (u32::try_from(n / 8)?, 1),
                128,
                &args,
            )?;
            let got = y.flatten_all()?.to_vec1::<f32>()?;
            let bv: Vec<Vec<f32>> = biases
                .iter()
                .map(|t| t.to_vec1::<f32>())
                .collect::<Result<_, _>>()?;
            let rv = res.flatten_all()?.to_vec1::<f32>()?;
            let what = format!("{sfx} b {b} k {k} norm {norm}: y");
            check_tile(&got, n, b, &what, |m, row| {
                let (a, r) = inp.row(m, norm, dt)?;
                let (i, rr) = match row {
                    r if r < rows[0] => (0, r),
                    r if r < rows[0] + rows[1] => (1, r - rows[0]),
                    r => (2, r - rows[0] - rows[1]),
                };
                let mut want = r * dot(&wv[i][rr * k..(rr + 1) * k], &a);
                if extras {
                    want += bv[i][rr] as f64 + rv[m * n + row] as f64;
                }
                Ok(want)
            })?;
        }
    }
    Ok(())
}

#[test]
fn gate_and_up_match_the_host() -> Res {
    std::env::set_var("LMKIT_DECODE_TC", "1");
    let l = Launcher::Emu;
    let dev = Device::Cpu;
    let (n, k) = (40usize, 160usize);
    for (dt, sfx) in [(DType::BF16, "bf16")] {
        for b in [3usize, 16] {
            let inp = Input::new(b, k);
            let wg = Tensor::from_vec(vals(n * k, 0.17, 0.4), (n, k), &dev)?.to_dtype(dt)?;
            let wu = Tensor::from_vec(vals(n * k, 0.29, 0.4), (n, k), &dev)?.to_dtype(dt)?;
            let f = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            let (gv, uv) = (f(&wg)?, f(&wu)?);
            let x = Tensor::from_vec(inp.x.clone(), (b, k), &dev)?;
            let nw = Tensor::from_vec(inp.nw.clone(), k, &dev)?;
            let out = Tensor::full(7f32, (16, n), &dev)?;
            let args = [
                Arg::Ptr(l.ptr(&wg)?),
                Arg::Ptr(l.ptr(&wu)?),
                Arg::Ptr(l.ptr(&x)?),
                Arg::Ptr(l.ptr(&out)?),
                Arg::int(n, "n")?,
                Arg::int(k, "k")?,
                Arg::int(b, "b")?,
                Arg::Ptr(l.ptr(&nw)?),
                Arg::F32(EPS),
            ];
            l.launch(
                &format!("dec_tgateup_{sfx}"),
                (u32::try_from(n / 8)?, 1),
                128,
                &args,
            )?;
            let got = out.flatten_all()?.to_vec1::<f32>()?;
            check_tile(&got, n, b, &format!("{sfx} b {b}: m"), |m, row| {
                let (a, r) = inp.row(m, true, dt)?;
                let g = r * dot(&gv[row * k..(row + 1) * k], &a);
                let u = r * dot(&uv[row * k..(row + 1) * k], &a);
                Ok(g / (1.0 + (-g).exp()) * u)
            })?;
        }
    }
    Ok(())
}

/// A bf16 model whose every product takes the tensor cores (the tiny config's widths are
/// whole chunks and tiles) decodes as the reference path does, to bf16 rounding.
#[test]
fn batched_bf16_decoding_tracks_the_reference_path() {
    std::env::set_var("LMKIT_DECODE_TC", "1");
    let m = model(&LlamaConfig::tiny(), DType::BF16, false);
    for batch in [4, 16] {
        let (d, same) = compare(&m, batch, 4, 5, 128);
        assert!(d < 0.05, "batch {batch}: relative logit difference {d}");
        assert!(same >= 0.85, "batch {batch}: argmax agreement {same}");
    }
}

/// Q8_0, Q4_1 and Q4_0 files decode on the tensor-core products (the blocks dequantized into
/// bf16 fragments, x rounded to bf16) as their dequantized f32 model does on the reference
/// path, to bf16 rounding. A one-token prompt keeps every step on the fused path.
#[test]
fn quantized_blocks_on_tensor_cores_track_their_dequantized_model() {
    std::env::set_var("LMKIT_DECODE_TC", "1");
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaConfig::tiny();
    for t in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q4_0] {
        let (f, q) = quantized_pair(dir.path(), &cfg, 5, t);
        for batch in [3, 16] {
            let (d, same) = compare_models(&f, &q, batch, 1, 5, 0);
            assert!(
                d < 0.05,
                "{t:?} batch {batch}: relative logit difference {d}"
            );
            assert!(same >= 0.85, "{t:?} batch {batch}: argmax agreement {same}");
        }
    }
}
