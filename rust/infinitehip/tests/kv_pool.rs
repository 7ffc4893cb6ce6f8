//! The paged pool returns exactly what was appended, through fork, copy-on-
//! write, truncation, per-head compaction and free.

use half::{bf16, f16};
use infinitehip::kv::{KvLayout, KvPool, KvRead};
use infinitehip::rng::Rng;
use infinitehip::{Element, Error};

fn layout() -> KvLayout {
    KvLayout {
        n_kv_heads: 3,
        head_dim: 8,
        page_size: 16,
    }
}

fn rows<T: Element>(rng: &mut Rng, n: usize) -> Vec<T> {
    (0..n * layout().token_elems())
        .map(|_| T::from_f32(rng.normal()))
        .collect()
}

fn bits<T: Element>(x: &[T]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits_u32()).collect()
}

fn round_trip<T: Element>() {
    let mut rng = Rng::new(7);
    let mut pool = KvPool::<T>::new(layout(), None).unwrap();
    pool.add_sequence(1).unwrap();
    let (mut k_all, mut v_all) = (Vec::new(), Vec::new());
    // Uneven appends that straddle pages.
    for n in [1usize, 15, 3, 40, 16, 7] {
        let (k, v) = (rows::<T>(&mut rng, n), rows::<T>(&mut rng, n));
        pool.append(1, &k, &v).unwrap();
        k_all.extend(k);
        v_all.extend(v);
    }
    let len = pool.seq_len(1).unwrap();
    assert_eq!(len, 82);
    let (k, v) = pool.read(1, 0, len).unwrap();
    assert_eq!(bits(&k), bits(&k_all));
    assert_eq!(bits(&v), bits(&v_all));
    let te = layout().token_elems();
    let (k, _) = pool.read(1, 20, 50).unwrap();
    assert_eq!(bits(&k), bits(&k_all[20 * te..50 * te]));
    // The view agrees with the engine layout.
    let view = pool.view(1).unwrap();
    let mut row = vec![0f32; 8];
    for t in [0usize, 15, 16, 81] {
        for h in 0..3 {
            view.read_key(h, t, &mut row);
            let want: Vec<f32> = k_all[t * te + h * 8..t * te + h * 8 + 8]
                .iter()
                .map(|x| x.to_f32())
                .collect();
            assert_eq!(row, want);
        }
    }
}

#[test]
fn round_trip_all_dtypes() {
    round_trip::<f32>();
    round_trip::<f16>();
    round_trip::<bf16>();
}

#[test]
fn fork_shares_pages_and_copies_on_write() {
    let mut rng = Rng::new(3);
    let mut pool = KvPool::<bf16>::new(layout(), None).unwrap();
    pool.add_sequence(1).unwrap();
    let (k, v) = (rows::<bf16>(&mut rng, 40), rows::<bf16>(&mut rng, 40));
    pool.append(1, &k, &v).unwrap();
    let pages_before = pool.stats().pages_in_use;
    pool.fork(1, 2).unwrap();
    assert_eq!(
        pool.stats().pages_in_use,
        pages_before,
        "fork must not copy"
    );
    assert!(pool
        .page_table(2)
        .unwrap()
        .iter()
        .all(|&p| pool.page_refcount(p) == 2));
    // Child appends into the shared, partly filled last page: it must copy.
    let (k2, v2) = (rows::<bf16>(&mut rng, 5), rows::<bf16>(&mut rng, 5));
    pool.append(2, &k2, &v2).unwrap();
    let (kp, _) = pool.read(1, 0, 40).unwrap();
    assert_eq!(bits(&kp), bits(&k), "parent changed by child's append");
    assert_eq!(pool.seq_len(1).unwrap(), 40);
    let (kc, vc) = pool.read(2, 0, 45).unwrap();
    assert_eq!(bits(&kc[..k.len()]), bits(&k));
    assert_eq!(bits(&kc[k.len()..]), bits(&k2));
    assert_eq!(bits(&vc[v.len()..]), bits(&v2));
    // Freeing the parent keeps the child's data; freeing both empties the pool.
    pool.free_sequence(1).unwrap();
    let (kc2, _) = pool.read(2, 0, 45).unwrap();
    assert_eq!(bits(&kc2), bits(&kc));
    pool.free_sequence(2).unwrap();
    assert_eq!(pool.stats().pages_in_use, 0);
    assert!(matches!(pool.read(2, 0, 1), Err(Error::UnknownSequence(2))));
}

#[test]
fn retain_per_head_compacts_and_frees() {
    let mut rng = Rng::new(11);
    let mut pool = KvPool::<f16>::new(layout(), None).unwrap();
    pool.add_sequence(5).unwrap();
    let (k, v) = (rows::<f16>(&mut rng, 70), rows::<f16>(&mut rng, 70));
    pool.append(5, &k, &v).unwrap();
    pool.fork(5, 6).unwrap();
    let before = pool.stats().pages_in_use;
    // Different tokens per head, same count.
    let keep: Vec<Vec<u32>> = (0..3)
        .map(|h| {
            let mut idx: Vec<u32> = (0..70u32).filter(|t| (t + h) % 3 != 0).collect();
            idx.truncate(30);
            idx
        })
        .collect();
    pool.retain_per_head(6, &keep).unwrap();
    assert_eq!(pool.seq_len(6).unwrap(), 30);
    let view = pool.view(6).unwrap();
    let te = layout().token_elems();
    let mut row = vec![0f32; 8];
    for (h, list) in keep.iter().enumerate() {
        for (slot, &t) in list.iter().enumerate() {
            view.read_key(h, slot, &mut row);
            let o = t as usize * te + h * 8;
            let want: Vec<f32> = k[o..o + 8].iter().map(|x| x.to_f32()).collect();
            assert_eq!(row, want, "head {h} slot {slot}");
        }
    }
    // The parent is untouched (its pages were shared).
    let (kp, _) = pool.read(5, 0, 70).unwrap();
    assert_eq!(bits(&kp), bits(&k));
    pool.free_sequence(5).unwrap();
    assert!(
        pool.stats().pages_in_use < before,
        "compaction freed nothing"
    );
    assert_eq!(pool.stats().pages_in_use, 2);
    // Unequal counts and unsorted lists are refused.
    let bad = vec![vec![0u32, 1], vec![0], vec![0, 1]];
    assert!(pool
        .retain_per_head(6, &bad)
        .unwrap_err()
        .to_string()
        .contains("counts must match"));
    let bad = vec![vec![1u32, 0], vec![0, 1], vec![0, 1]];
    assert!(pool.retain_per_head(6, &bad).is_err());
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let mut pool = KvPool::<f32>::new(layout(), Some(2)).unwrap();
    pool.add_sequence(1).unwrap();
    assert!(matches!(
        pool.add_sequence(1),
        Err(Error::DuplicateSequence(1))
    ));
    let e = pool.append(1, &[0.0; 23], &[0.0; 23]).unwrap_err();
    assert!(
        e.to_string().contains("multiples of kv_heads*head_dim"),
        "{e}"
    );
    let full = vec![1.0f32; 33 * 24];
    assert!(matches!(
        pool.append(1, &full, &full),
        Err(Error::OutOfPages { .. })
    ));
    assert_eq!(
        pool.seq_len(1).unwrap(),
        0,
        "a failed append must leave the sequence as it was"
    );
    assert!(pool.read(1, 0, 1).is_err());
    assert!(matches!(
        pool.append(9, &[], &[]),
        Err(Error::UnknownSequence(9))
    ));
    assert!(KvPool::<f32>::new(
        KvLayout {
            n_kv_heads: 0,
            head_dim: 8,
            page_size: 16
        },
        None
    )
    .is_err());
}
