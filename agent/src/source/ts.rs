pub use ember_ts::*;
