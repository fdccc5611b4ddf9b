//! Sensor drivers. A real accelerometer driver implements [`Sensor`] (reading its registers over
//! I2C/SPI); [`ReplayImu`] implements it by replaying recorded BasicMotions series, so the
//! node produces realistic motion data with no sensor attached.

use ember_proto::node::MAX_CHANNELS;

/// A sensor read failed (bus error, device not answering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SensorError;

pub trait Sensor {
    /// Channels per sample (at most [`MAX_CHANNELS`]).
    fn channels(&self) -> usize;
    /// Reads one sample into `out[..channels()]`.
    fn read(&mut self, out: &mut [f32; MAX_CHANNELS]) -> Result<(), SensorError>;
}

include!(concat!(env!("OUT_DIR"), "/basic_motions.rs"));

/// A 6-axis IMU (3-D accelerometer + 3-D gyroscope) replaying [`BASIC_MOTIONS`] in a loop.
#[derive(Debug, Clone, Default)]
pub struct ReplayImu {
    next: usize,
}

impl ReplayImu {
    pub const fn new() -> Self {
        ReplayImu { next: 0 }
    }
}

impl Sensor for ReplayImu {
    fn channels(&self) -> usize {
        6
    }

    fn read(&mut self, out: &mut [f32; MAX_CHANNELS]) -> Result<(), SensorError> {
        out[..6].copy_from_slice(&BASIC_MOTIONS[self.next]);
        self.next = (self.next + 1) % BASIC_MOTIONS.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_the_four_series_in_a_loop() {
        assert_eq!(BASIC_MOTIONS.len(), 400);
        let mut imu = ReplayImu::new();
        let mut out = [0.0; MAX_CHANNELS];
        let mut first = [0.0; MAX_CHANNELS];
        imu.read(&mut first).expect("replay never fails");
        for _ in 1..400 {
            imu.read(&mut out).expect("replay never fails");
        }
        imu.read(&mut out).expect("replay never fails");
        assert_eq!(out, first, "wraps around after 400 steps");
        // BasicMotions' first test case starts at -0.740653 on its first axis.
        assert_eq!(first[0], -0.740653);
        assert!(BASIC_MOTIONS.iter().flatten().all(|v| v.is_finite()));
    }
}
