use ember_models::data::{self, DataError, TEST_SHA256, TRAIN_SHA256};
use ember_models::hex;

use crate::{basic_motions, models_dir};

#[test]
fn data_files_match_their_sha256() {
    let dir = models_dir().join("data");
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    let mut checked = 0;
    for line in sums.lines() {
        let (sum, file) = line.split_once("  ").unwrap();
        let bytes = std::fs::read(dir.join(file)).unwrap();
        assert_eq!(hex::sha256(&bytes), sum, "{file} differs from SHA256SUMS");
        let expected = if file == data::TRAIN_FILE {
            TRAIN_SHA256
        } else {
            TEST_SHA256
        };
        assert_eq!(
            sum, expected,
            "SHA256SUMS and ember_models::data disagree on {file}"
        );
        checked += 1;
    }
    assert_eq!(checked, 2);
}

#[test]
fn basic_motions_has_the_published_shape() {
    let bm = basic_motions();
    for split in [&bm.train, &bm.test] {
        assert_eq!(split.len(), 40);
        assert_eq!((split.channels, split.window), (6, 100));
        assert_eq!(
            split.labels,
            ["Standing", "Running", "Walking", "Badminton"]
        );
        for k in 0..4 {
            assert_eq!(split.y.iter().filter(|&&y| y == k).count(), 10);
        }
        assert_eq!(split.x.len(), 40 * 600);
    }
}

#[test]
fn a_changed_data_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(data::TRAIN_FILE);
    let mut bytes = std::fs::read(models_dir().join("data").join(data::TRAIN_FILE)).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let err = data::load_file(&path, TRAIN_SHA256).unwrap_err();
    assert!(matches!(err, DataError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains("fetch-basicmotions.sh"), "{err}");
}

#[test]
fn a_malformed_ts_file_names_the_line() {
    let text = "@problemName x\n@dimensions 2\n@classLabel true a b\n@data\n1,2:3,4:a\n1,2:a\n";
    let err = ember_ts::parse_ts(text).unwrap_err().to_string();
    assert!(err.starts_with("line 6:"), "{err}");
}
