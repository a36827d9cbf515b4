//! The cross-entropy kernels of `cuda/fused.cu` (the output layer's loss on a GPU) run on the
//! CPU emulator of lmkit's kernels (`cuda-emu`), against their CPU twins in
//! `lmkit_core::xent`: f32 to rounding, bf16 logits read the same way on both sides.

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

#[test]
fn cross_entropy_kernels_match_their_cpu_twins() -> Res {
    let dev = Device::Cpu;
    let l = Launcher::Emu;
    // Rows wider than a block (v > 256 threads, not a multiple of it), targets at both ends.
    let (rows, v) = (6usize, 1037usize);
    let zs: Vec<f32> = (0..rows * v)
        .map(|i| ((i as f32) * 0.173).sin() * 4.0)
        .collect();
    let ys: Vec<u32> = vec![0, 5, 1036, 17, 512, 999];
    let gs: Vec<f32> = (0..rows).map(|r| 0.25 + r as f32 * 0.5).collect();
    let y = Tensor::new(ys.as_slice(), &dev)?;
    let g = Tensor::new(gs.as_slice(), &dev)?;
    for (dt, sfx, tol) in [(DType::F32, "f32", 1e-5f32), (DType::BF16, "bf16", 1e-5)] {
        let z = Tensor::from_vec(zs.clone(), (rows, v), &dev)?.to_dtype(dt)?;
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
        let want_nll = xent::row_nll(&z, &y)?.to_vec1::<f32>()?;
        let want_dz = xent::row_nll_grad(&z, &y, &g)?.to_dtype(DType::F32)?;
        close(
            &nll.to_vec1::<f32>()?,
            &want_nll,
            tol,
            &format!("nll {sfx}"),
        );
        // dz is stored in the logits' dtype: within one rounding of it.
        let dz_tol = if dt == DType::F32 { 1e-5 } else { 8e-3 };
        close(
            &dz.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            &want_dz.flatten_all()?.to_vec1::<f32>()?,
            dz_tol,
            &format!("dz {sfx}"),
        );
    }
    // A target outside the row gives NaN, as on the CPU.
    let z = Tensor::from_vec(zs[..v].to_vec(), (1, v), &dev)?;
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
    assert!(nll.to_vec1::<f32>()?[0].is_nan());
    Ok(())
}
