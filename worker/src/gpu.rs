//! GPU metrics through NVML, behind a trait so that tests can drive a fake device.
//!
//! Every interval the sidecar samples each device and emits one `gpu.metrics` event per device
//! and one `gpu.process` event per running compute process, with the device index, UUID and
//! name in metadata and the unit in every measurement key. A value the device does not support
//! (power on some boards, for instance) is left out rather than failing the sample. Without the
//! NVIDIA driver, or without a GPU, there are no events: one log line at start says why, and the
//! hub is told the worker has no GPU.

use nvml_wrapper::{
    Nvml,
    enum_wrappers::device::{Clock, TemperatureSensor},
    enums::device::UsedGpuMemory,
};

// The event and key names are the documented contract (README, GPU metrics), shared with
// `bridge top` and the simulator so that neither drifts from what NVML emits.
use bridge_proto::protocol::gpu::{
    COMPUTE_PROCESSES, DEVICE, MEMORY_TOTAL_BYTES, MEMORY_USED_BYTES, METRICS_EVENT, NAME, PID,
    POWER_WATTS, PROCESS_EVENT, SM_CLOCK_MHZ, TEMPERATURE_CELSIUS, USED_MEMORY_BYTES,
    UTILIZATION_GPU_PERCENT, UTILIZATION_MEMORY_PERCENT, UUID,
};

use crate::{emitter::Emitter, value::Value};

/// One device at one moment. `None` means the device did not report that value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceSample {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub utilization_gpu_percent: Option<u32>,
    pub utilization_memory_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_celsius: Option<u32>,
    pub power_watts: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    pub processes: Vec<GpuProcess>,
}

/// A compute process on a device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuProcess {
    pub pid: u32,
    pub used_memory_bytes: Option<u64>,
}

/// Where GPU samples come from.
pub trait GpuSource: Send {
    /// What the worker tells the hub it has, e.g. `2x NVIDIA A100-SXM4-80GB`.
    fn describe(&self) -> String;
    /// Every device, now.
    fn sample(&mut self) -> Vec<DeviceSample>;
}

/// The real thing: the NVIDIA driver's management library, loaded at run time.
#[derive(Debug)]
pub struct NvmlSource {
    nvml: Nvml,
    count: u32,
    description: String,
}

impl NvmlSource {
    /// Loads NVML and finds at least one device; the error says why not, in one line.
    pub fn open() -> Result<Self, String> {
        let nvml = Nvml::init().map_err(|e| format!("NVML is not available ({e})"))?;
        let count = nvml
            .device_count()
            .map_err(|e| format!("NVML cannot count devices ({e})"))?;
        if count == 0 {
            return Err("NVML found no GPU".into());
        }
        let name = nvml
            .device_by_index(0)
            .and_then(|d| d.name())
            .unwrap_or_else(|_| "GPU".into());
        Ok(Self {
            nvml,
            count,
            description: format!("{count}x {name}"),
        })
    }
}

impl GpuSource for NvmlSource {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn sample(&mut self) -> Vec<DeviceSample> {
        (0..self.count)
            .filter_map(|index| {
                let device = self.nvml.device_by_index(index).ok()?;
                let utilization = device.utilization_rates().ok();
                let memory = device.memory_info().ok();
                Some(DeviceSample {
                    index,
                    uuid: device.uuid().unwrap_or_default(),
                    name: device.name().unwrap_or_default(),
                    utilization_gpu_percent: utilization.as_ref().map(|u| u.gpu),
                    utilization_memory_percent: utilization.as_ref().map(|u| u.memory),
                    memory_used_bytes: memory.as_ref().map(|m| m.used),
                    memory_total_bytes: memory.as_ref().map(|m| m.total),
                    temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
                    // NVML reports milliwatts.
                    power_watts: device.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
                    sm_clock_mhz: device.clock_info(Clock::SM).ok(),
                    processes: device
                        .running_compute_processes()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|p| GpuProcess {
                            pid: p.pid,
                            used_memory_bytes: match p.used_gpu_memory {
                                UsedGpuMemory::Used(bytes) => Some(bytes),
                                UsedGpuMemory::Unavailable => None,
                            },
                        })
                        .collect(),
                })
            })
            .collect()
    }
}

/// Made-up devices with fixed, recognisable values, for tests and demos without a GPU.
#[derive(Debug, Clone)]
pub struct FakeGpus {
    pub devices: Vec<DeviceSample>,
}

impl FakeGpus {
    /// `count` devices named "Fake GPU", each with one compute process.
    pub fn new(count: u32) -> Self {
        Self {
            devices: (0..count)
                .map(|index| DeviceSample {
                    index,
                    uuid: format!("GPU-fake-{index:04}"),
                    name: "Fake GPU".into(),
                    utilization_gpu_percent: Some(87),
                    utilization_memory_percent: Some(42),
                    memory_used_bytes: Some(30 << 30),
                    memory_total_bytes: Some(80 << 30),
                    temperature_celsius: Some(64),
                    power_watts: Some(312.5),
                    sm_clock_mhz: Some(1410),
                    processes: vec![GpuProcess {
                        pid: 4242 + index,
                        used_memory_bytes: Some(29 << 30),
                    }],
                })
                .collect(),
        }
    }
}

impl GpuSource for FakeGpus {
    fn describe(&self) -> String {
        format!("{}x Fake GPU", self.devices.len())
    }

    fn sample(&mut self) -> Vec<DeviceSample> {
        self.devices.clone()
    }
}

/// Emits one sample: `gpu.metrics` per device, `gpu.process` per compute process.
pub fn emit(emitter: &Emitter, samples: &[DeviceSample]) {
    for device in samples {
        let index = device.index.to_string();
        let metadata = [
            (DEVICE, index.as_str()),
            (UUID, device.uuid.as_str()),
            (NAME, device.name.as_str()),
        ];
        let mut measurements: Vec<(&str, Value<'_>)> = Vec::with_capacity(8);
        let mut put = |key, value: Option<Value<'static>>| {
            if let Some(value) = value {
                measurements.push((key, value));
            }
        };
        put(
            UTILIZATION_GPU_PERCENT,
            device.utilization_gpu_percent.map(Value::from),
        );
        put(
            UTILIZATION_MEMORY_PERCENT,
            device.utilization_memory_percent.map(Value::from),
        );
        put(MEMORY_USED_BYTES, device.memory_used_bytes.map(Value::from));
        put(
            MEMORY_TOTAL_BYTES,
            device.memory_total_bytes.map(Value::from),
        );
        put(
            TEMPERATURE_CELSIUS,
            device.temperature_celsius.map(Value::from),
        );
        put(POWER_WATTS, device.power_watts.map(Value::from));
        put(SM_CLOCK_MHZ, device.sm_clock_mhz.map(Value::from));
        put(COMPUTE_PROCESSES, Some(Value::from(device.processes.len())));
        emitter.emit(METRICS_EVENT, &measurements, &metadata, None);
        for process in &device.processes {
            let mut measurements = vec![(PID, Value::from(process.pid))];
            if let Some(bytes) = process.used_memory_bytes {
                measurements.push((USED_MEMORY_BYTES, Value::from(bytes)));
            }
            emitter.emit(PROCESS_EVENT, &measurements, &metadata, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::v1::telemetry_value::Value as V;

    #[test]
    fn fake_devices_become_events_with_units_in_their_keys() {
        let emitter = Emitter::detached(64);
        let mut gpus = FakeGpus::new(2);
        assert_eq!(gpus.describe(), "2x Fake GPU");
        emit(&emitter, &gpus.sample());
        let events = emitter.buffered();
        let names: Vec<String> = events.iter().map(|e| e.event_parts.join(".")).collect();
        assert_eq!(
            names,
            ["gpu.metrics", "gpu.process", "gpu.metrics", "gpu.process"]
        );

        let metrics = &events[2];
        assert_eq!(metrics.metadata["device"], "1");
        assert_eq!(metrics.metadata["uuid"], "GPU-fake-0001");
        assert_eq!(metrics.metadata["name"], "Fake GPU");
        let value = |key: &str| metrics.measurements[key].value.clone().unwrap();
        assert_eq!(value("utilization_gpu_percent"), V::IntValue(87));
        assert_eq!(value("utilization_memory_percent"), V::IntValue(42));
        assert_eq!(value("memory_used_bytes"), V::IntValue(30 << 30));
        assert_eq!(value("memory_total_bytes"), V::IntValue(80 << 30));
        assert_eq!(value("temperature_celsius"), V::IntValue(64));
        assert_eq!(value("power_watts"), V::FloatValue(312.5));
        assert_eq!(value("sm_clock_mhz"), V::IntValue(1410));
        assert_eq!(value("compute_processes"), V::IntValue(1));

        let process = &events[3];
        assert_eq!(process.measurements["pid"].value, Some(V::IntValue(4243)));
        assert_eq!(
            process.measurements["used_memory_bytes"].value,
            Some(V::IntValue(29 << 30))
        );
    }

    #[test]
    fn unsupported_values_are_left_out() {
        let emitter = Emitter::detached(8);
        let device = DeviceSample {
            index: 0,
            uuid: "GPU-x".into(),
            name: "Old GPU".into(),
            utilization_gpu_percent: Some(5),
            ..Default::default()
        };
        emit(&emitter, &[device]);
        let event = &emitter.buffered()[0];
        let mut keys: Vec<_> = event.measurements.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["compute_processes", "utilization_gpu_percent"]);
    }

    /// Passes with and without a GPU, and runs the real NVML path either way: with a GPU, what
    /// the source reports must agree with NVML itself; without one (no driver, or no device, as
    /// on CI), opening must fail in one line that says why.
    #[test]
    fn nvml_reports_what_it_sees_or_says_why_not_in_one_line() {
        match NvmlSource::open() {
            Ok(source) => reports_what_nvml_sees(source),
            Err(reason) => {
                assert!(!reason.contains('\n'), "{reason}");
                assert!(reason.starts_with("NVML"), "{reason}");
            }
        }
    }

    fn reports_what_nvml_sees(mut source: NvmlSource) {
        let count = source.nvml.device_count().expect("device count");
        let samples = source.sample();
        assert_eq!(samples.len(), count as usize, "one sample per device");
        let first = source.nvml.device_by_index(0).and_then(|d| d.name());
        assert_eq!(
            source.describe(),
            format!("{count}x {}", first.unwrap_or_else(|_| "GPU".into()))
        );
        for (index, sample) in (0..count).zip(&samples) {
            let device = source.nvml.device_by_index(index).expect("device");
            assert_eq!(sample.index, index);
            assert_eq!(sample.uuid, device.uuid().unwrap_or_default());
            assert_eq!(sample.name, device.name().unwrap_or_default());
            assert_eq!(
                sample.memory_total_bytes,
                device.memory_info().ok().map(|m| m.total)
            );
            if let Some(percent) = sample.utilization_gpu_percent {
                assert!(percent <= 100, "{sample:?}");
            }
        }
        let emitter = Emitter::detached(1024);
        emit(&emitter, &samples);
        let events = emitter.buffered();
        let devices: Vec<&str> = events
            .iter()
            .filter(|e| e.event_parts.join(".") == METRICS_EVENT)
            .map(|e| e.metadata["device"].as_str())
            .collect();
        let expected: Vec<String> = (0..count).map(|i| i.to_string()).collect();
        assert_eq!(devices, expected);
    }
}
