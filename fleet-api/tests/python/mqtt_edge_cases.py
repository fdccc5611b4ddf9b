#!/usr/bin/env python3
"""Publishes Ember messages a fleet must cope with, from a client that is not the agent.

A paho-mqtt (QoS 1) client sends, for one device: a valid telemetry batch, the same batch
again (a duplicate), garbage, a future schema version, an oversized payload, a batch that
claims to be another device, a batch with a corrupted record CRC, a second valid batch, and a
status whose last_seq covers one record that was never sent and one that was evicted.

It prints, as one JSON object on stdout, what a correct fleet must then report: rejects per
reason, records stored, duplicates, and the lost ranges of the ledger.

    python3 mqtt_edge_cases.py --port 1883 --device py-dev --oversize 4096
"""

import argparse
import json
import struct
import sys
import time
import zlib

import paho.mqtt.client as mqtt

STREAM = "imu"


def envelope_crc(device, stream, seq, ts, values):
    """CRC32 of the record envelope, as docs/protocol.md defines it."""
    data = device.encode() + b"\x00" + stream.encode() + b"\x00"
    data += struct.pack("<QQ", seq, ts)
    data += struct.pack("<%df" % len(values), *values)
    return zlib.crc32(data) & 0xFFFFFFFF


def batch(device, seqs, ts0, crc_device=None):
    records = []
    for seq in seqs:
        # Multiples of 0.25 are exact in f32, so JSON, f32 and the CRC agree.
        values = [seq * 0.25, -seq * 0.5]
        ts = ts0 + seq * 1000
        crc = envelope_crc(crc_device or device, STREAM, seq, ts, values)
        records.append({"seq": seq, "ts": ts, "values": values, "crc": crc})
    return {"v": 1, "device": device, "stream": STREAM, "records": records}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", default="py-dev")
    p.add_argument("--oversize", type=int, default=262144,
                   help="the fleet's ingest.max_payload_bytes")
    args = p.parse_args()

    dev = args.device
    ts0 = int(time.time() * 1_000_000)
    topic = "ember/v1/%s/telemetry" % dev
    valid = json.dumps(batch(dev, range(1, 6), ts0))
    big = batch(dev, [100], ts0)
    big["padding"] = "x" * (args.oversize + 1)  # unknown fields are allowed; size is not
    bad_crc = batch(dev, [6], ts0)
    bad_crc["records"][0]["crc"] ^= 1
    status = {
        "v": 1, "device": dev, "state": "online", "ts": ts0, "models": {},
        "streams": [{"stream": STREAM, "last_seq": 10, "queued": 0,
                     "evicted": [{"from": 9, "to": 9, "reason": "bytes"}]}],
    }
    messages = [
        (topic, valid, False),
        (topic, valid, False),  # duplicate
        (topic, b"\x00garbage", False),  # malformed
        (topic, json.dumps({"v": 2, "device": dev, "stream": STREAM, "records": []}), False),
        (topic, json.dumps(big), False),  # too_large
        (topic, json.dumps(batch("py-other", [7], ts0)), False),  # device_mismatch
        (topic, json.dumps(bad_crc), False),  # crc
        (topic, json.dumps(batch(dev, range(6, 9), ts0)), False),
        ("ember/v1/%s/status" % dev, json.dumps(status), True),
    ]

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ember-py-%s" % dev)
    client.connect(args.host, args.port, keepalive=10)
    client.loop_start()
    try:
        for t, payload, retain in messages:
            info = client.publish(t, payload, qos=1, retain=retain)
            info.wait_for_publish(timeout=10)
            if not info.is_published():
                print("publish to %s was not acknowledged" % t, file=sys.stderr)
                return 1
    finally:
        client.disconnect()
        client.loop_stop()

    print(json.dumps({
        "device": dev,
        "stream": STREAM,
        "rejects": {"malformed": 1, "unsupported_version": 1, "too_large": 1,
                    "device_mismatch": 1, "crc": 1},
        "received": 8,
        "duplicates": 5,
        "lost": [[10, 10]],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
