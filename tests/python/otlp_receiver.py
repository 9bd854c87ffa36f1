"""An OTLP/gRPC receiver built on the official OpenTelemetry protobufs (PyPI `opentelemetry-proto`,
the definitions the Collector serves), for the hub's export tests.

Prints `listening on PORT`, then one JSON line per log record or span it accepted (ids in hex,
attributes as [type, value]) and one per request it refused. Modes:
  ok                  accept everything
  unavailable:SECONDS answer UNAVAILABLE from the first request until SECONDS later
  hang                never answer
"""

import json
import sys
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

MODE = sys.argv[1] if len(sys.argv) > 1 else "ok"
LOCK = threading.Lock()
FIRST_REQUEST = []


def emit(line):
    with LOCK:
        print(json.dumps(line), flush=True)


def value(any_value):
    kind = any_value.WhichOneof("value")
    return [kind, getattr(any_value, kind)] if kind else [None, None]


def attributes(key_values):
    return {kv.key: value(kv.value) for kv in key_values}


def refuse(context, signal, count):
    """Applies the mode; True when the request was refused (or is never answered)."""
    if MODE == "hang":
        emit({"signal": signal, "hanging": count})
        time.sleep(3600)
        return True
    if MODE.startswith("unavailable:"):
        with LOCK:
            if not FIRST_REQUEST:
                FIRST_REQUEST.append(time.monotonic())
            refusing = time.monotonic() - FIRST_REQUEST[0] < float(MODE.split(":")[1])
        if refusing:
            emit({"signal": signal, "refused": count})
            context.abort(grpc.StatusCode.UNAVAILABLE, "the receiver is refusing for now")
    return False


class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def Export(self, request, context):
        count = sum(len(s.log_records) for r in request.resource_logs for s in r.scope_logs)
        if refuse(context, "logs", count):
            return logs_service_pb2.ExportLogsServiceResponse()
        for resource_logs in request.resource_logs:
            resource = attributes(resource_logs.resource.attributes)
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    emit({
                        "signal": "logs",
                        "resource": resource,
                        "scope": scope_logs.scope.name,
                        "event_name": record.event_name,
                        "time": record.time_unix_nano,
                        "observed": record.observed_time_unix_nano,
                        "severity": record.severity_text,
                        "trace_id": record.trace_id.hex(),
                        "span_id": record.span_id.hex(),
                        "attributes": attributes(record.attributes),
                    })
        return logs_service_pb2.ExportLogsServiceResponse()


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        if refuse(context, "traces", count):
            return trace_service_pb2.ExportTraceServiceResponse()
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    emit({
                        "signal": "traces",
                        "resource": resource,
                        "name": span.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano,
                        "status_code": span.status.code,
                        "status_message": span.status.message,
                        "attributes": attributes(span.attributes),
                    })
        return trace_service_pb2.ExportTraceServiceResponse()


class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def Export(self, request, context):
        for resource_metrics in request.resource_metrics:
            resource = attributes(resource_metrics.resource.attributes)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind = metric.WhichOneof("data")
                    for point in getattr(metric, kind).data_points:
                        line = {
                            "signal": "metrics",
                            "resource": resource,
                            "name": metric.name,
                            "unit": metric.unit,
                            "kind": kind,
                            "attributes": attributes(point.attributes),
                        }
                        if kind == "sum":
                            line["value"] = point.as_double
                            line["monotonic"] = metric.sum.is_monotonic
                        else:
                            line["count"] = point.count
                            line["sum"] = point.sum
                            line["bucket_counts"] = list(point.bucket_counts)
                        emit(line)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    emit_line = f"listening on {port}"
    with LOCK:
        print(emit_line, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
