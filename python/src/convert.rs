//! Python values to what the worker library takes, with the errors the API promises: a
//! measurement that is not an int, float or str is a `TypeError` naming its key, a bad event
//! name a `ValueError` saying what is wrong with it.

use std::cell::RefCell;

use bridge_proto::{pattern::validate_event_name, protocol::events};
use pyo3::{
    exceptions::{PyOverflowError, PyTypeError, PyValueError},
    intern,
    prelude::*,
    types::{PyDict, PyFloat, PyInt, PyString},
};
use smallvec::SmallVec;
use worker::Value;

// Events carry a few measurements and metadata each: four fit inline, more spill to the heap.
// The vectors are filled in place by the caller's frame (never returned by value): moving
// them costs more than filling them, at these sizes.

/// A dict's items, held so that what is borrowed from them (strings) lives long enough.
pub(crate) type Items<'py> = SmallVec<[(Bound<'py, PyAny>, Bound<'py, PyAny>); 4]>;

pub(crate) type Measurements<'a> = SmallVec<[(&'a str, Value<'a>); 4]>;
pub(crate) type Metadata<'a> = SmallVec<[(&'a str, &'a str); 4]>;

#[inline]
pub(crate) fn fill<'py>(items: &mut Items<'py>, dict: Option<&Bound<'py, PyDict>>) {
    if let Some(dict) = dict {
        items.extend(dict.iter());
    }
}

/// Checks an event's name, converts its two dicts and hands them to `emit`: the converted
/// values borrow from the dicts' items, which stay in this (inlined) frame.
#[inline]
pub(crate) fn with_event<R>(
    name: &str,
    measurements: Option<&Bound<'_, PyDict>>,
    metadata: Option<&Bound<'_, PyDict>>,
    emit: impl FnOnce(&Measurements<'_>, &Metadata<'_>) -> PyResult<R>,
) -> PyResult<R> {
    check_name(name)?;
    let mut measured = Items::new();
    fill(&mut measured, measurements);
    let mut values = Measurements::new();
    self::measurements(&measured, &mut values)?;
    let mut described = Items::new();
    fill(&mut described, metadata);
    stringify(&mut described)?;
    let mut pairs = Metadata::new();
    self::metadata(&described, &mut pairs)?;
    emit(&values, &pairs)
}

/// Checks an event name as the hub would, and refuses the protocol's own `bridge.` names.
/// Callers emit the same few names over and over, so the last valid one is remembered per
/// thread and a repeat costs a comparison.
pub(crate) fn check_name(name: &str) -> PyResult<()> {
    thread_local! {
        static LAST_VALID: RefCell<String> = const { RefCell::new(String::new()) };
    }
    LAST_VALID.with(|last| {
        if *last.borrow() == name {
            return Ok(());
        }
        validate_event_name(name)
            .map_err(|e| PyValueError::new_err(format!("invalid event name: {e}")))?;
        if events::is_reserved(name) {
            return Err(PyValueError::new_err(format!(
                "invalid event name: `{name}`: names under `{}.` belong to the protocol",
                events::RESERVED_PREFIX
            )));
        }
        name.clone_into(&mut last.borrow_mut());
        Ok(())
    })
}

/// Checks a span's operation: its events (`OP.start`...) must be valid names.
pub(crate) fn check_operation(operation: &str) -> PyResult<()> {
    validate_event_name(operation)
        .map_err(|e| PyValueError::new_err(format!("invalid span operation: {e}")))?;
    if events::is_reserved(operation) {
        return Err(PyValueError::new_err(format!(
            "invalid span operation: `{operation}`: names under `{}.` belong to the protocol",
            events::RESERVED_PREFIX
        )));
    }
    Ok(())
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

#[inline]
fn key<'a>(key: &'a Bound<'_, PyAny>, what: &str) -> PyResult<&'a str> {
    match key.cast::<PyString>() {
        Ok(key) => key.to_str(),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{what} keys must be str, not {}",
            type_name(key)
        ))),
    }
}

#[inline]
/// One measurement: int (anything with `__index__`, like numpy's integers), float or str.
pub(crate) fn measurement<'a>(name: &str, value: &'a Bound<'_, PyAny>) -> PyResult<Value<'a>> {
    let int = |value: &Bound<'_, PyAny>| {
        value.extract::<i64>().map(Value::Int).map_err(|_| {
            PyOverflowError::new_err(format!(
                "measurement `{name}`: {value} does not fit in a signed 64-bit int"
            ))
        })
    };
    if let Ok(v) = value.cast::<PyInt>() {
        return int(v.as_any());
    }
    if let Ok(v) = value.cast::<PyFloat>() {
        return Ok(Value::Float(v.value()));
    }
    if let Ok(v) = value.cast::<PyString>() {
        return Ok(Value::Str(v.to_str()?));
    }
    if value.hasattr(intern!(value.py(), "__index__"))? {
        return int(value);
    }
    Err(PyTypeError::new_err(format!(
        "measurement `{name}` is {}: measurements are int, float or str",
        type_name(value)
    )))
}

#[inline]
pub(crate) fn measurements<'a>(items: &'a Items<'_>, out: &mut Measurements<'a>) -> PyResult<()> {
    for (k, v) in items {
        let k = key(k, "measurement")?;
        out.push((k, measurement(k, v)?));
    }
    Ok(())
}

/// Metadata values are strings; anything else is converted with `str()`, as the seed emitter
/// does. Keys must be strings.
#[inline]
pub(crate) fn stringify(items: &mut Items<'_>) -> PyResult<()> {
    for (_, value) in items.iter_mut() {
        if !value.is_instance_of::<PyString>() {
            *value = value.str()?.into_any();
        }
    }
    Ok(())
}

#[inline]
pub(crate) fn metadata<'a>(items: &'a Items<'_>, out: &mut Metadata<'a>) -> PyResult<()> {
    for (k, v) in items {
        let v = v.cast::<PyString>().map_err(|_| {
            PyTypeError::new_err("metadata values must be str (call stringify first)")
        })?;
        out.push((key(k, "metadata")?, v.to_str()?));
    }
    Ok(())
}
