//! PNG input: header sizes bounded before allocation, compressed text capped, malformed
//! parameters reported, RGBA and grey converted to RGB as PIL's `convert("RGB")` does.

use std::path::PathBuf;

use flux_pipeline::read_png;

fn tmp(name: &str) -> PathBuf {
    flux_golden::scratch(name)
}

fn encode(
    path: &PathBuf,
    w: u32,
    h: u32,
    color: png::ColorType,
    data: Option<&[u8]>,
    text: &[(&str, &str, bool)],
) {
    let f = std::fs::File::create(path).unwrap();
    let mut e = png::Encoder::new(std::io::BufWriter::new(f), w, h);
    e.set_color(color);
    e.set_depth(png::BitDepth::Eight);
    for (k, v, compressed) in text {
        if *compressed {
            e.add_ztxt_chunk(k.to_string(), v.to_string()).unwrap();
        } else {
            e.add_itxt_chunk(k.to_string(), v.to_string()).unwrap();
        }
    }
    let mut w = e.write_header().unwrap();
    match data {
        Some(d) => w.write_image_data(d).unwrap(),
        // without data: a valid header and a token IDAT chunk (the decoder's header read
        // stops at the first IDAT)
        None => w
            .write_chunk(png::chunk::IDAT, &[0x78, 0x9c, 0x03, 0x00])
            .unwrap(),
    }
}

#[test]
fn header_sizes_are_bounded_before_allocation() {
    // 100000 × 100000 RGB would be 30 GB: refused from the header alone
    let p = tmp("huge.png");
    encode(&p, 100_000, 100_000, png::ColorType::Rgb, None, &[]);
    let e = read_png(&p).unwrap_err();
    assert!(e.to_string().contains("larger than 8192"), "{e}");
}

#[test]
fn malformed_parameters_are_reported_not_ignored() {
    let p = tmp("badjson.png");
    encode(
        &p,
        2,
        2,
        png::ColorType::Rgb,
        Some(&[0; 12]),
        &[("flux:parameters", "{ not json", false)],
    );
    let e = read_png(&p).unwrap_err();
    assert!(e.to_string().contains("not valid parameters JSON"), "{e}");
    // a plain PNG without parameters is fine
    let q = tmp("plain.png");
    encode(&q, 2, 2, png::ColorType::Rgb, Some(&[7; 12]), &[]);
    assert!(read_png(&q).unwrap().params.is_none());
}

#[test]
fn rgba_and_grey_become_rgb() {
    let p = tmp("rgba.png");
    encode(
        &p,
        2,
        1,
        png::ColorType::Rgba,
        Some(&[1, 2, 3, 0, 4, 5, 6, 255]),
        &[],
    );
    assert_eq!(read_png(&p).unwrap().image.data, vec![1, 2, 3, 4, 5, 6]);
    let g = tmp("grey.png");
    encode(&g, 2, 1, png::ColorType::Grayscale, Some(&[9, 200]), &[]);
    assert_eq!(
        read_png(&g).unwrap().image.data,
        vec![9, 9, 9, 200, 200, 200]
    );
}

/// A compressed parameters chunk that inflates to megabytes is refused (1 MiB cap), not
/// inflated into memory.
#[test]
fn compressed_text_is_capped() {
    let p = tmp("bomb.png");
    let f = std::fs::File::create(&p).unwrap();
    let mut e = png::Encoder::new(std::io::BufWriter::new(f), 2, 2);
    e.set_color(png::ColorType::Rgb);
    e.set_depth(png::BitDepth::Eight);
    let mut w = e.write_header().unwrap();
    let mut chunk = png::text_metadata::ITXtChunk::new("flux:parameters", " ".repeat(4 << 20));
    chunk.compress_text().unwrap();
    w.write_text_chunk(&chunk).unwrap();
    w.write_image_data(&[0; 12]).unwrap();
    drop(w);
    let e = read_png(&p).unwrap_err();
    assert!(e.to_string().contains("flux:parameters"), "{e}");
}
