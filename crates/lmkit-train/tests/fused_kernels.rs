//! The cross-entropy kernels (the output layer's loss on a GPU) run on the CPU emulator of
//! lmkit's kernels (`cuda-emu`), against their CPU twins in `lmkit_core::xent`: `xent_fwd` and
//! `xent_bwd` of `cuda/fused.cu`, and `tr_xent` of `cuda/train.cu` (through
//! `BlockOps::xent_in_place`), which writes the gradient over the logits. f32 to rounding;
//! bf16/f16 logits read the same way on both sides, the gradient within one rounding of its
//! dtype. Rows of 1,037 take the one-value loops; rows of 12,296 the 16-byte loads, several per
//! thread, with logits that grow along the row so that each thread's running max moves.

use lmkit_core::block_ops::BlockOps;
use lmkit_core::launch::{Arg, Launcher};
use lmkit_core::{xent, DType, Device, Tensor};

type Res = Result<(), Box<dyn std::error::Error>>;

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what} [{i}]: {x} vs {y}"
        );
    }
}

const DTYPES: [(DType, &str); 3] = [
    (DType::F32, "f32"),
    (DType::BF16, "bf16"),
    (DType::F16, "f16"),
];

/// Logits `(rows, v)` in `dt`, targets at both ends and inside, and per-row factors.
fn case(
    rows: usize,
    v: usize,
    dt: DType,
) -> Result<(Tensor, Tensor, Tensor), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let zs: Vec<f32> = (0..rows * v)
        .map(|i| ((i as f32) * 0.173).sin() * 4.0 + 3.0 * (i % v) as f32 / v as f32)
        .collect();
    let ys: Vec<u32> = (0..rows as u32)
        .map(|r| match r % 4 {
            0 => 0,
            1 => v as u32 - 1,
            2 => (r * 997) % v as u32,
            _ => v as u32 / 2 + 3,
        })
        .collect();
    let gs: Vec<f32> = (0..rows).map(|r| 0.25 + r as f32 * 0.5).collect();
    Ok((
        Tensor::from_vec(zs, (rows, v), &dev)?.to_dtype(dt)?,
        Tensor::new(ys.as_slice(), &dev)?,
        Tensor::new(gs.as_slice(), &dev)?,
    ))
}

/// The CPU twins' nll and gradient (as f32).
fn twins(
    z: &Tensor,
    y: &Tensor,
    g: &Tensor,
) -> Result<(Vec<f32>, Vec<f32>), Box<dyn std::error::Error>> {
    Ok((
        xent::row_nll(z, y)?.to_vec1::<f32>()?,
        xent::row_nll_grad(z, y, g)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?,
    ))
}

fn flat(t: &Tensor) -> Result<Vec<f32>, Box<dyn std::error::Error>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The gradient is stored in the logits' dtype: within one rounding of it.
fn grad_tol(dt: DType) -> f32 {
    match dt {
        DType::F32 => 1e-5,
        DType::BF16 => 8e-3,
        _ => 1e-3,
    }
}

#[test]
fn cross_entropy_kernels_match_their_cpu_twins() -> Res {
    let dev = Device::Cpu;
    let l = Launcher::Emu;
    for (rows, v) in [(6usize, 1037usize), (4, 12_296)] {
        for (dt, sfx) in DTYPES {
            let (z, y, g) = case(rows, v, dt)?;
            let nll = Tensor::zeros(rows, DType::F32, &dev)?;
            let dz = Tensor::zeros((rows, v), dt, &dev)?;
            let n = Arg::int(rows, "rows")?;
            let w = Arg::int(v, "vocabulary")?;
            let (pz, py, pg) = (l.ptr(&z)?, l.ptr(&y)?, l.ptr(&g)?);
            let rows32 = u32::try_from(rows)?;
            l.launch(
                &format!("xent_fwd_{sfx}"),
                (rows32, 1),
                256,
                &[Arg::Ptr(pz), Arg::Ptr(py), Arg::Ptr(l.ptr(&nll)?), n, w],
            )?;
            l.launch(
                &format!("xent_bwd_{sfx}"),
                (rows32, 1),
                256,
                &[
                    Arg::Ptr(pz),
                    Arg::Ptr(py),
                    Arg::Ptr(pg),
                    Arg::Ptr(l.ptr(&dz)?),
                    n,
                    w,
                ],
            )?;
            let (want_nll, want_dz) = twins(&z, &y, &g)?;
            let what = format!("{sfx} rows of {v}");
            close(
                &nll.to_vec1::<f32>()?,
                &want_nll,
                1e-5,
                &format!("nll {what}"),
            );
            close(&flat(&dz)?, &want_dz, grad_tol(dt), &format!("dz {what}"));
        }
    }
    Ok(())
}

#[test]
fn the_in_place_kernel_matches_the_cpu_twins() -> Res {
    let dev = Device::Cpu;
    for (rows, v) in [(6usize, 1037usize), (4, 12_296)] {
        for (dt, sfx) in DTYPES {
            let ops = BlockOps::new(Launcher::Emu, dt, &dev)?;
            let mut bits = Vec::new();
            for scalar in [false, true] {
                let (z, y, g) = case(rows, v, dt)?;
                let (want_nll, want_dz) = twins(&z, &y, &g)?;
                Launcher::emu_force_scalar(scalar);
                let nll = ops.xent_in_place(&z, &y, &g);
                Launcher::emu_force_scalar(false);
                let (nll, dz) = (nll?.to_vec1::<f32>()?, flat(&z)?);
                let what = format!("{sfx} rows of {v}, one value per load: {scalar}");
                close(&nll, &want_nll, 1e-5, &format!("nll {what}"));
                close(&dz, &want_dz, grad_tol(dt), &format!("dz {what}"));
                bits.push((nll, dz));
            }
            // 16-byte loads or one value at a time: the same sums in the same order.
            assert!(
                bits[0] == bits[1],
                "{sfx} rows of {v}: the two loops differ"
            );
        }
    }
    Ok(())
}

#[test]
fn a_target_outside_the_row_gives_nan() -> Res {
    let dev = Device::Cpu;
    let l = Launcher::Emu;
    let v = 1040;
    let (z, _, g) = case(1, v, DType::F32)?;
    let bad = Tensor::new(&[v as u32 + 3], &dev)?;
    let nll = Tensor::zeros(1, DType::F32, &dev)?;
    l.launch(
        "xent_fwd_f32",
        (1, 1),
        256,
        &[
            Arg::Ptr(l.ptr(&z)?),
            Arg::Ptr(l.ptr(&bad)?),
            Arg::Ptr(l.ptr(&nll)?),
            Arg::int(1, "rows")?,
            Arg::int(v, "vocabulary")?,
        ],
    )?;
    assert!(nll.to_vec1::<f32>()?[0].is_nan(), "xent_fwd");
    // The in-place kernel: NaN too, and the gradient is g·softmax with no target column.
    let (_, want_dz) = twins(&z, &bad, &g)?;
    let ops = BlockOps::new(Launcher::Emu, DType::F32, &dev)?;
    let nll = ops.xent_in_place(&z, &bad, &g)?;
    assert!(nll.to_vec1::<f32>()?[0].is_nan(), "tr_xent");
    close(
        &flat(&z)?,
        &want_dz,
        1e-5,
        "tr_xent's gradient, target outside",
    );
    // Bad shapes and dtypes are refused with an error.
    let wrong = Tensor::new(&[1u32, 2], &dev)?;
    assert!(ops.xent_in_place(&z, &wrong, &g).is_err());
    let z16 = z.to_dtype(DType::BF16)?;
    assert!(ops.xent_in_place(&z16, &bad, &g).is_err());
    Ok(())
}

/// `tr_scale` (a loss's upstream gradient applied to the gradients its forward pass computed):
/// `x · s` with `s` read on the device, in each dtype, over lengths that end mid-group (1,037:
/// the last group one value at a time) and whole groups; a factor that is not one f32 value,
/// or values in another dtype, are refused.
#[test]
fn the_scale_kernel_multiplies_by_a_device_scalar() -> Res {
    let dev = Device::Cpu;
    for (dt, name) in DTYPES {
        let ops = BlockOps::new(Launcher::Emu, dt, &dev)?;
        for n in [1037usize, 4096] {
            let xs: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
            let x = Tensor::from_vec(xs, n, &dev)?.to_dtype(dt)?;
            let s = Tensor::new(&[-1.5f32], &dev)?;
            let got = ops.scale(&x, &s)?;
            assert_eq!(got.dtype(), dt);
            let want = (&x * -1.5)?;
            close(&flat(&got)?, &flat(&want)?, 0.0, &format!("{name} {n}"));
        }
        let x = Tensor::zeros(8, dt, &dev)?;
        assert!(ops.scale(&x, &Tensor::new(&[1f32, 2.0], &dev)?).is_err());
        let other = if dt == DType::F32 {
            DType::BF16
        } else {
            DType::F32
        };
        let s = Tensor::new(&[1f32], &dev)?;
        assert!(ops.scale(&x.to_dtype(other)?, &s).is_err());
    }
    Ok(())
}
