//! LazyLLM revival in llama.cpp decode (patch 0010, `llama_lazy_revive`):
//! the aux cache round trip, which cells the new token's attention revives,
//! and the masks of revived rows (causal at their own positions).

use infinitehip::config::LazyPoint;
use infinitehip_bridge::ffi::TensorDesc;
use infinitehip_bridge::llama::View;
use infinitehip_bridge::llama_lazy::LazyRows;
use infinitehip_bridge::llama_lazy_revive::ReviveMode;

fn desc(dtype: u32, ne: [i64; 4], es: u64) -> TensorDesc {
    TensorDesc {
        dtype,
        ne0: ne[0],
        ne1: ne[1],
        ne2: ne[2],
        ne3: ne[3],
        nb0: es,
        nb1: es * ne[0] as u64,
        nb2: es * (ne[0] * ne[1]) as u64,
        nb3: es * (ne[0] * ne[1] * ne[2]) as u64,
    }
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// 4 layers, one point at layer 1 keeping half; a prompt of 6 tokens in
/// cells 0..6, cells 1, 2, 4 pruned at layer 1 with their hidden rows stored.
fn pruned(mode: ReviveMode) -> LazyRows {
    let mut l = LazyRows::new(
        4,
        vec![LazyPoint {
            layer: 1,
            keep: 0.5,
        }],
    )
    .unwrap();
    l.set_revive_mode(mode);
    l.begin_ubatch(&[0, 1, 2, 3, 4, 5], &[0, 1, 2, 3, 4, 5]);
    l.mark_pruned(1, &[1, 2, 4]);
    let rows: Vec<f32> = (0..9).map(|x| x as f32).collect(); // n_embd 3
    l.aux_store(1, &[1, 2, 4], &rows).unwrap();
    l
}

#[test]
fn aux_rows_come_back_once() {
    let l = pruned(ReviveMode::All);
    assert_eq!(l.revive_plan(0), vec![1, 1, 2, 2, 4, 4]);
    let mut out = vec![0f32; 6];
    l.aux_take(&[2, 4], &mut out).unwrap();
    assert_eq!(out, vec![3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    assert!(l.aux_take(&[2], &mut out[..3]).is_err(), "taken twice");
    l.revive_begin(&[2, 4]);
    assert_eq!((l.depth(2), l.depth(4), l.depth(1)), (4, 4, 2));
    assert_eq!(l.revive_plan(0), vec![1, 1]);
    // a new ubatch writing cell 1 drops its aux row
    l.begin_ubatch(&[1], &[7]);
    assert!(l.revive_plan(0).is_empty());
    assert_eq!(l.stats()["revived"], 2);
    // off: nothing is stored or revived
    let l = pruned(ReviveMode::Off);
    assert!(l.revive_plan(0).is_empty());
    assert_eq!(l.stats()["aux_rows"], 0);
}

/// The new token (last q row) attends only to `hot` among cells 0..7 at the
/// point's layer (cell 6 holds it); the others get ~0 weight.
fn rank(l: &LazyRows, hot: usize) {
    let (d, n_kv) = (4usize, 8usize);
    let q: Vec<f32> = vec![1.0; d];
    let mut k = vec![0f32; d * n_kv];
    for i in 0..d {
        k[hot * d + i] = 10.0;
    }
    let mut mask = vec![0f32; n_kv];
    mask[7] = f32::NEG_INFINITY; // an empty cell
    let (qb, kb, mb) = (f32_bytes(&q), f32_bytes(&k), f32_bytes(&mask));
    let (qd, kd, md) = (
        desc(0, [d as i64, 1, 1, 1], 4),
        desc(0, [d as i64, 1, n_kv as i64, 1], 4),
        desc(0, [n_kv as i64, 1, 1, 1], 4),
    );
    let qv = View::new(&qb, &qd, "q").unwrap();
    let kv = View::new(&kb, &kd, "k").unwrap();
    let mv = View::new(&mb, &md, "mask").unwrap();
    l.revive_rank(0, 1.0, &qv, &kv, &mv, 0).unwrap();
}

#[test]
fn the_new_tokens_attention_picks_what_comes_back() {
    let l = pruned(ReviveMode::Top(64));
    assert!(l.revive_plan(0).is_empty(), "nothing ranked yet");
    l.begin_ubatch(&[6], &[6]); // the decode token
    rank(&l, 2);
    // top half of the 7 visible cells by weight: cell 2 first, then ties
    // (equal weights) to the later cells: 6, 5, 4. Pruned among them: 2, 4.
    assert_eq!(l.revive_plan(0), vec![2, 2, 4, 4]);
    // a cap of one keeps the most important
    let mut l = pruned(ReviveMode::Top(1));
    l.set_revive_mode(ReviveMode::Top(1));
    l.begin_ubatch(&[6], &[6]);
    rank(&l, 1);
    assert_eq!(l.revive_plan(0), vec![1, 1]);
    // revived cells are not picked again
    l.revive_begin(&[1]);
    rank(&l, 1);
    assert_eq!(l.revive_plan(0), vec![4, 4]);
}

#[test]
fn revived_rows_see_cells_up_to_their_position() {
    let l = pruned(ReviveMode::All);
    l.begin_ubatch(&[6], &[6]);
    l.revive_begin(&[2, 4]);
    let n_kv = 8;
    // the decode row's mask: cells 0..7 visible
    let mut mask = vec![0f32; n_kv];
    mask[7] = f32::NEG_INFINITY;
    let (mb, md) = (f32_bytes(&mask), desc(0, [n_kv as i64, 1, 1, 1], 4));
    // rows: revived 0 (cell 2, pos 2), revived 1 (cell 4, pos 4), the decode row
    let rows = [-1i32, -2, 0];
    let mut out = vec![0u8; 3 * n_kv * 4];
    l.mask(2, &mb, &md, &rows, &[2, 4], 0, 1024, 0, 1, &mut out)
        .unwrap();
    let o: Vec<f32> = out
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let ninf = f32::NEG_INFINITY;
    // cell 1 is still pruned at layer 2: hidden for every row
    assert_eq!(&o[..8], &[0.0, ninf, 0.0, ninf, ninf, ninf, ninf, ninf]);
    assert_eq!(&o[8..16], &[0.0, ninf, 0.0, 0.0, 0.0, ninf, ninf, ninf]);
    assert_eq!(&o[16..], &[0.0, ninf, 0.0, 0.0, 0.0, 0.0, 0.0, ninf]);
    // a revived row id without a position is an error
    assert!(l
        .mask(2, &mb, &md, &[-3], &[2, 4], 0, 1024, 0, 1, &mut out[..32])
        .is_err());
}
