//! Packing, unpacking and position ids.

use candle::{DType, Device, Tensor};
use flux_dit::*;
use flux_golden::max_abs_diff;
use proptest::prelude::*;

fn arange(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::arange(0u32, n as u32, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .reshape(shape)
        .unwrap()
}

#[test]
fn pack_index_formula_from_the_spec() {
    // packed[b, r·(w/2)+c_, ch·4 + ph·2 + pw] = z[b, ch, 2r+ph, 2c_+pw], on (1, 16, 6, 8).
    let z = arange(&[1, 16, 6, 8]);
    let p = pack(&z).unwrap();
    assert_eq!(p.dims(), &[1, 12, 64]);
    let z4: Vec<Vec<Vec<f32>>> = z.squeeze(0).unwrap().to_vec3().unwrap();
    let pv: Vec<Vec<f32>> = p.squeeze(0).unwrap().to_vec2().unwrap();
    for r in 0..3 {
        for c in 0..4 {
            for ch in 0..16 {
                for ph in 0..2 {
                    for pw in 0..2 {
                        assert_eq!(
                            pv[r * 4 + c][ch * 4 + ph * 2 + pw],
                            z4[ch][2 * r + ph][2 * c + pw]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn ids_by_hand() {
    let ids = img_ids(2, 4, 6, 0.0, &Device::Cpu).unwrap();
    assert_eq!(ids.dims(), &[2, 6, 3]);
    let v: Vec<Vec<f32>> = ids.get(1).unwrap().to_vec2().unwrap();
    assert_eq!(v[4], vec![0.0, 1.0, 1.0]); // token 4 = row 1, col 1 of a 2×3 grid
    let t = txt_ids(1, 5, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[1, 5, 3]);
    assert_eq!(t.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn bad_shapes_are_errors() {
    assert!(matches!(
        pack(&arange(&[1, 16, 5, 8])),
        Err(Error::InputShape { .. })
    ));
    assert!(matches!(
        pack(&arange(&[16, 6, 8])),
        Err(Error::InputShape { .. })
    ));
    assert!(matches!(
        unpack(&arange(&[1, 12, 64]), 6, 10),
        Err(Error::InputShape { .. })
    ));
    assert!(matches!(
        unpack(&arange(&[1, 12, 63]), 6, 8),
        Err(Error::InputShape { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn pack_unpack_round_trip(b in 1usize..3, c in 1usize..17, h2 in 1usize..9, w2 in 1usize..9) {
        let z = arange(&[b, c, 2 * h2, 2 * w2]);
        let p = pack(&z).unwrap();
        prop_assert_eq!(p.dims(), &[b, h2 * w2, 4 * c]);
        let back = unpack(&p, 2 * h2, 2 * w2).unwrap();
        let diff = max_abs_diff(&back, &z);
        prop_assert_eq!(diff, 0.0);
        let ids = img_ids(b, 2 * h2, 2 * w2, 0.0, &Device::Cpu).unwrap();
        prop_assert_eq!(ids.dims(), &[b, h2 * w2, 3]);
    }
}
