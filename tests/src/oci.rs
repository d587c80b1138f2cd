//! Writing OCI image layouts with random layers, to push to a test registry.
//!
//! Layers are uncompressed tars holding one file of random bytes, so their size is what
//! the test asks for and nobody (skopeo with `--preserve-digests`, containerd) recompresses
//! them. With more than one platform the image is an index of one manifest per platform,
//! each with its own layers.
use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{ensure, Context, Result};
use rand::{RngCore, SeedableRng};
use serde_json::json;
use sha2::{Digest as _, Sha256};

pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// One blob of the image: its digest (`sha256:<hex>`), size and media type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

impl Blob {
    /// The hex part of the digest (the store's file name).
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }

    /// The blob's OCI descriptor: media type, digest and size.
    pub fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// What to build: layer payload sizes per platform, and the platforms (`os/arch`).
#[derive(Clone, Debug)]
pub struct ImageSpec {
    pub layer_sizes: Vec<u64>,
    /// One platform gives a plain manifest; two or more give an index.
    pub platforms: Vec<String>,
}

impl ImageSpec {
    pub fn single(layer_sizes: &[u64]) -> Self {
        Self {
            layer_sizes: layer_sizes.to_vec(),
            platforms: vec!["linux/amd64".into()],
        }
    }

    pub fn multi_arch(layer_sizes: &[u64], platforms: &[&str]) -> Self {
        Self {
            layer_sizes: layer_sizes.to_vec(),
            platforms: platforms.iter().map(|p| p.to_string()).collect(),
        }
    }
}

/// One platform's manifest and what it references.
#[derive(Clone, Debug)]
pub struct PlatformImage {
    pub platform: String,
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Blob>,
}

impl PlatformImage {
    /// Manifest, config and layers.
    pub fn blobs(&self) -> Vec<Blob> {
        let mut all = vec![self.manifest.clone(), self.config.clone()];
        all.extend(self.layers.iter().cloned());
        all
    }

    pub fn total_bytes(&self) -> u64 {
        self.blobs().iter().map(|b| b.size).sum()
    }
}

/// An image layout on disk.
#[derive(Clone, Debug)]
pub struct Image {
    pub layout: PathBuf,
    pub tag: String,
    /// What the tag points at: the index, or the only manifest.
    pub top: Blob,
    pub platforms: Vec<PlatformImage>,
}

impl Image {
    /// Every blob of the image (index, manifests, configs, layers), each once.
    pub fn blobs(&self) -> Vec<Blob> {
        let mut all = Vec::new();
        if self.is_index() {
            all.push(self.top.clone());
        }
        for p in &self.platforms {
            all.extend(p.blobs());
        }
        all
    }

    pub fn is_index(&self) -> bool {
        self.top.media_type == MEDIA_INDEX
    }

    /// Bytes of index, manifests, configs and layers: what one pull of every platform
    /// must read from upstream at least once.
    pub fn total_bytes(&self) -> u64 {
        self.blobs().iter().map(|b| b.size).sum()
    }

    /// The layers of every platform.
    pub fn layers(&self) -> Vec<Blob> {
        self.platforms
            .iter()
            .flat_map(|p| p.layers.iter().cloned())
            .collect()
    }

    /// The largest layer.
    pub fn largest_layer(&self) -> Blob {
        self.layers()
            .into_iter()
            .max_by_key(|b| b.size)
            .expect("an image has layers")
    }

    /// The bytes of a blob, read back from the layout.
    pub fn read_blob(&self, blob: &Blob) -> Result<Vec<u8>> {
        let path = blob_path(&self.layout, &blob.digest);
        fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }
}

/// `<layout>/blobs/sha256/<hex>`.
pub fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Write an OCI image layout for `spec` at `layout`, tagged `tag`.
pub fn write_layout(layout: &Path, tag: &str, spec: &ImageSpec) -> Result<Image> {
    ensure!(!spec.platforms.is_empty(), "an image needs a platform");
    fs::create_dir_all(layout.join("blobs/sha256"))?;
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut platforms = Vec::new();
    for platform in &spec.platforms {
        let (os, arch) = platform
            .split_once('/')
            .with_context(|| format!("platform {platform:?} is not os/arch"))?;
        let mut layers = Vec::new();
        for (i, size) in spec.layer_sizes.iter().enumerate() {
            layers.push(write_random_layer(layout, &mut rng, i, *size)?);
        }
        // Uncompressed layers: the diff id is the layer digest.
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
        let config = json!({
            "architecture": arch,
            "os": os,
            "created": "2026-01-01T00:00:00Z",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = write_json_blob(layout, MEDIA_CONFIG, &config)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        let manifest = write_json_blob(layout, MEDIA_MANIFEST, &manifest)?;
        platforms.push(PlatformImage {
            platform: platform.clone(),
            manifest,
            config,
            layers,
        });
    }
    let top = if platforms.len() == 1 {
        platforms[0].manifest.clone()
    } else {
        let manifests: Vec<serde_json::Value> = platforms
            .iter()
            .map(|p| {
                let (os, arch) = p.platform.split_once('/').expect("checked above");
                let mut d = p.manifest.descriptor();
                d["platform"] = json!({"os": os, "architecture": arch});
                d
            })
            .collect();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": manifests,
        });
        write_json_blob(layout, MEDIA_INDEX, &index)?
    };
    let mut top_descriptor = top.descriptor();
    top_descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    let layout_index = json!({"schemaVersion": 2, "manifests": [top_descriptor]});
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&layout_index)?,
    )?;
    Ok(Image {
        layout: layout.to_path_buf(),
        tag: tag.to_string(),
        top,
        platforms,
    })
}

/// Write `value` as a JSON blob into the layout's blob directory.
pub fn write_json_blob(layout: &Path, media_type: &str, value: &serde_json::Value) -> Result<Blob> {
    write_blob(layout, media_type, &serde_json::to_vec(value)?)
}

/// Write `bytes` into the layout's blob directory, named by their sha256.
pub fn write_blob(layout: &Path, media_type: &str, bytes: &[u8]) -> Result<Blob> {
    let hex = hex::encode(Sha256::digest(bytes));
    fs::write(layout.join("blobs/sha256").join(&hex), bytes)?;
    Ok(Blob {
        digest: format!("sha256:{hex}"),
        size: bytes.len() as u64,
        media_type: media_type.to_string(),
    })
}

/// A tar holding `data-<index>.bin` with `size` random bytes.
fn write_random_layer(
    layout: &Path,
    rng: &mut rand::rngs::StdRng,
    index: usize,
    size: u64,
) -> Result<Blob> {
    let tmp = layout.join(format!("blobs/layer-{index}.tmp"));
    let mut file = std::io::BufWriter::with_capacity(1 << 20, fs::File::create(&tmp)?);
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut put = |bytes: &[u8], file: &mut std::io::BufWriter<fs::File>| -> Result<()> {
        hasher.update(bytes);
        total += bytes.len() as u64;
        file.write_all(bytes)?;
        Ok(())
    };
    let header = tar_header(&format!("data-{index}.bin"), size)?;
    put(&header, &mut file)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        rng.fill_bytes(&mut chunk[..n]);
        put(&chunk[..n], &mut file)?;
        left -= n as u64;
    }
    // Pad the file to a 512-byte block, then the two zero blocks that end an archive.
    let pad = (512 - (size % 512) as usize) % 512;
    put(&vec![0u8; pad + 1024], &mut file)?;
    file.flush()?;
    drop(file);
    let hex = hex::encode(hasher.finalize());
    fs::rename(&tmp, layout.join("blobs/sha256").join(&hex))?;
    Ok(Blob {
        digest: format!("sha256:{hex}"),
        size: total,
        media_type: MEDIA_LAYER_TAR.to_string(),
    })
}

/// A ustar header for one regular file.
fn tar_header(name: &str, size: u64) -> Result<[u8; 512]> {
    ensure!(name.len() < 100, "tar member name too long: {name}");
    let mut h = [0u8; 512];
    let field = |h: &mut [u8; 512], at: usize, value: &[u8]| {
        h[at..at + value.len()].copy_from_slice(value);
    };
    field(&mut h, 0, name.as_bytes());
    field(&mut h, 100, b"0000644\0");
    field(&mut h, 108, b"0000000\0");
    field(&mut h, 116, b"0000000\0");
    field(&mut h, 124, format!("{size:011o}\0").as_bytes());
    field(
        &mut h,
        136,
        format!("{:011o}\0", 1_767_225_600u64).as_bytes(),
    );
    field(&mut h, 148, b"        ");
    h[156] = b'0';
    field(&mut h, 257, b"ustar\0");
    field(&mut h, 263, b"00");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    field(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_digests_match_contents() {
        let dir = tempfile::tempdir().unwrap();
        let image = write_layout(
            dir.path(),
            "v1",
            &ImageSpec::multi_arch(&[1000, 70_000], &["linux/amd64", "linux/arm64"]),
        )
        .unwrap();
        assert!(image.is_index());
        // index + 2 × (manifest + config + 2 layers)
        assert_eq!(image.blobs().len(), 9);
        for blob in image.blobs() {
            let bytes = image.read_blob(&blob).unwrap();
            assert_eq!(bytes.len() as u64, blob.size);
            assert_eq!(blob.hex(), hex::encode(Sha256::digest(&bytes)));
        }
        let layer = image.read_blob(&image.platforms[0].layers[1]).unwrap();
        assert_eq!(layer.len() % 512, 0);
        assert_eq!(&layer[257..263], b"ustar\0");
    }
}
