"""ami-share's benchmark: driven by bench/run (see there). Talks only to the local emulator.

Measures the release `bootstrap` (target/release/ami-share-lambda) as Lambda runs it, through a local
Runtime API served here, against the AWS emulator (tests/emulator.py: moto with its fidelity fixes, which
records every AWS request with its start and end and adds a fixed latency per request, so the depth of a
chain of calls shows up as wall time too):

- init: process start -> its first GET /runtime/invocation/next; median and max over N cold starts;
- peak RSS (VmHWM) of a cold start plus one CreateImage invocation;
- per scenario: AWS calls by operation, mutating calls, sequential round-trip depth (the longest chain of
  requests each starting after the previous one ended), the invocation's wall time;
- a peer: a minimal Python/boto3 handler doing the same first step (its EC2, KMS and SSM clients built,
  then GET /next), its init measured the same way, as a ratio.

Prints a table with the targets beside the figures, and writes bench/out/results.json.
"""

import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGION = "us-east-1"
FIVE = ["us-west-2", "eu-central-1", "eu-west-1", "ap-southeast-2", "ca-central-1"]
LATENCY = 0.05
TARGETS = {"init_median_ms": 15.0, "peak_rss_mb": 32.0, "depth": 4, "duplicate_mutating": 0}


class RuntimeApi:
    """The Lambda Runtime API, enough of it: events go out on GET /next, answers come back by POST."""

    def __init__(self):
        self.events = queue.Queue()
        self.answers = queue.Queue()
        self.first_next = None
        self.first_next_seen = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.endswith("/runtime/invocation/next"):
                    if not api.first_next_seen.is_set():
                        api.first_next = time.perf_counter()
                        api.first_next_seen.set()
                    request_id, event = api.events.get()
                    if request_id is None:  # shutting down this process: never answer
                        time.sleep(3600)
                    body = json.dumps(event).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Lambda-Runtime-Aws-Request-Id", request_id)
                    self.send_header("Lambda-Runtime-Deadline-Ms", str(int(time.time() * 1000) + 300_000))
                    self.send_header(
                        "Lambda-Runtime-Invoked-Function-Arn",
                        "arn:aws:lambda:us-east-1:123456789012:function:ami-share",
                    )
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_response(404)
                    self.end_headers()

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                kind = self.path.rsplit("/", 1)[-1]
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()
                api.answers.put((kind, body))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = "127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self):
        self.first_next = None
        self.first_next_seen.clear()

    def invoke(self, event, n=[0]):
        n[0] += 1
        started = time.perf_counter()
        self.events.put((f"req-{n[0]:06d}", event))
        kind, body = self.answers.get(timeout=120)
        return kind, json.loads(body or b"null"), time.perf_counter() - started


def start_emulator():
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests/emulator.py")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    endpoint = json.loads(process.stdout.readline())["endpoint"]
    return process, endpoint


def control(endpoint, what, body=None):
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/_ami_share/{what}", data=data)) as r:
        return json.loads(r.read())


def client(service, endpoint, region=REGION):
    return boto3.client(service, region_name=region, endpoint_url=endpoint,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def make_image(ec2, name, kms_key=None):
    mappings = []
    if kms_key:
        mappings = [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 8, "Encrypted": True, "KmsKeyId": kms_key}}]
    instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, BlockDeviceMappings=mappings)
    return ec2.create_image(InstanceId=instance["Instances"][0]["InstanceId"], Name=name)["ImageId"]


def event_for(image_id):
    with open(os.path.join(ROOT, "events/create-image.json")) as f:
        event = json.load(f)
    event["region"] = REGION
    event["detail"]["awsRegion"] = REGION
    event["detail"]["responseElements"]["imageId"] = image_id
    return event


def depth(entries):
    """The longest chain of requests, each starting after the previous one ended."""
    entries = sorted(entries, key=lambda e: e["start"])
    longest = []
    for i, entry in enumerate(entries):
        before = [longest[j] for j in range(i) if entries[j]["end"] <= entry["start"]]
        longest.append(1 + max(before, default=0))
    return max(longest, default=0)


def is_mutating(action):
    return not action.startswith(("Describe", "Get", "List"))


def env_for(endpoint, config):
    env = {
        "PATH": os.environ.get("PATH", ""),
        # AWS_REGION for the Rust SDK (as Lambda sets it), AWS_DEFAULT_REGION for boto3 (the peer).
        "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true",
        "AMI_SHARE_CONFIG": config,
        # What Lambda sets for every function (lambda_runtime reads them at start).
        "AWS_LAMBDA_FUNCTION_NAME": "ami-share-bench", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST", "AWS_LAMBDA_LOG_STREAM_NAME": "bench",
        "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/ami-share-bench",
    }
    return env


def cold_start(api, command, env):
    """Starts the function; returns (process, seconds from exec to its first GET /next)."""
    api.reset()
    started = time.perf_counter()
    process = subprocess.Popen(command, env=dict(env, AWS_LAMBDA_RUNTIME_API=api.address),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not api.first_next_seen.wait(30):
        process.kill()
        raise RuntimeError(f"{command[0]} never asked for an event (exit code {process.wait()})")
    return process, api.first_next - started


def stop(api, process):
    process.kill()
    process.wait()
    api.events.put((None, None))  # release the handler thread blocked on this process's GET /next


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


PEER = """
import os, time, urllib.request
import boto3
session = boto3.session.Session()
clients = [session.client(s) for s in ("ec2", "kms", "ssm")]
urllib.request.urlopen("http://%s/2018-06-01/runtime/invocation/next" % os.environ["AWS_LAMBDA_RUNTIME_API"])
"""


def main():
    binary = sys.argv[1]
    starts = int(os.environ.get("BENCH_COLD_STARTS", "20"))
    out_dir = os.path.join(ROOT, "bench/out")
    os.makedirs(out_dir, exist_ok=True)
    emulator, endpoint = start_emulator()
    try:
        org = control(endpoint, "organization", {"ous": []})
        ec2 = client("ec2", endpoint)
        for region in ["us-west-2"] + FIVE[1:]:
            kms = client("kms", endpoint, region)
            key = kms.create_key(Description="bench")["KeyMetadata"]["Arn"]
            kms.create_alias(AliasName="alias/ami-share", TargetKeyId=key)
        cmk = client("kms", endpoint).create_key(Description="bench cmk", Tags=[
            {"TagKey": "ami-share:manage-key-policy", "TagValue": "true"}])["KeyMetadata"]["Arn"]
        five = ", ".join(f'{{ region = "{r}", kms_key = "alias/ami-share" }}' for r in FIVE)
        config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        config.write(f"""
[[rule]]
name = "golden"
match.name = ["golden-*"]
tags = {{ team = "platform" }}
share.organizations = ["{org['arn']}"]
share.accounts = ["210987654321"]

[[rule]]
name = "one-region"
match.name = ["west-*"]
share.organizations = ["{org['arn']}"]
copy.regions = [{{ region = "us-west-2", kms_key = "alias/ami-share" }}]

[[rule]]
name = "five-regions"
match.name = ["wide-*"]
share.organizations = ["{org['arn']}"]
copy.regions = [{five}]
""")
        config.close()
        env = env_for(endpoint, config.name)
        api = RuntimeApi()

        # Cold starts: exec -> first GET /next.
        inits = []
        for _ in range(starts):
            process, seconds = cold_start(api, [binary], env)
            inits.append(seconds * 1000)
            stop(api, process)
        peer_env = dict(env)
        peer_inits = []
        for _ in range(starts):
            process, seconds = cold_start(api, [sys.executable, "-c", PEER], peer_env)
            peer_inits.append(seconds * 1000)
            stop(api, process)

        # Scenarios, on one process: the first invocation is a cold start's, for the peak RSS.
        images = {
            "CreateImage, unencrypted": make_image(ec2, "golden-unencrypted"),
            "CreateImage, CMK-encrypted": make_image(ec2, "golden-cmk", cmk),
            "1 target region": make_image(ec2, "west-1"),
            "5 target regions": make_image(ec2, "wide-1"),
            "non-matching AMI": make_image(ec2, "scratch-1"),
        }
        # moto builds a region's AMI catalogue on the first EC2 call there, holding Python's lock, which
        # would serialize the function's concurrent first calls (an emulator artifact, not AWS's):
        # warm every region first.
        for region in [REGION] + FIVE:
            client("ec2", endpoint, region).describe_images(Owners=["self"])
        control(endpoint, "latency", {"seconds": LATENCY})
        process, _ = cold_start(api, [binary], env)
        scenarios = []
        rss = None
        order = list(images) + ["duplicate delivery"]
        for label in order:
            image = images.get(label) or images["CreateImage, unencrypted"]
            before = len(control(endpoint, "requests"))
            kind, answer, seconds = api.invoke(event_for(image))
            if rss is None:
                rss = peak_rss_mb(process.pid)
            entries = [e for e in control(endpoint, "requests")[before:]]
            by_operation = {}
            for e in entries:
                name = f"{e['service']}:{e['action']}"
                by_operation[name] = by_operation.get(name, 0) + 1
            scenarios.append({
                "scenario": label,
                "answer": kind if kind != "response" else answer.get("status"),
                "calls": len(entries),
                "mutating": sum(1 for e in entries if is_mutating(e["action"] or "")),
                "depth": depth(entries),
                "wall_ms": round(seconds * 1000),
                "by_operation": by_operation,
            })
        stop(api, process)
    finally:
        emulator.kill()

    result = {
        "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
        "latency_per_request_ms": LATENCY * 1000,
        "cold_starts": starts,
        "init_ms": {"median": round(statistics.median(inits), 2), "max": round(max(inits), 2)},
        "peer_boto3_init_ms": {"median": round(statistics.median(peer_inits), 1), "max": round(max(peer_inits), 1)},
        "peer_ratio": round(statistics.median(peer_inits) / statistics.median(inits), 1),
        "peak_rss_mb": round(rss, 1),
        "binary_mb": round(os.path.getsize(binary) / 1e6, 1),
        "scenarios": scenarios,
        "targets": TARGETS,
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)

    def verdict(ok):
        return "meets" if ok else "MISSES"

    one = next(s for s in scenarios if s["scenario"] == "1 target region")
    five_s = next(s for s in scenarios if s["scenario"] == "5 target regions")
    dup = next(s for s in scenarios if s["scenario"] == "duplicate delivery")
    print(f"\nami-share benchmark ({os.cpu_count()} cores; {result['binary_mb']} MB release bootstrap; "
          f"{LATENCY * 1000:.0f} ms added to every AWS request)\n")
    print("| figure | value | target | |")
    print("|---|---|---|---|")
    rows = [
        (f"init, median of {starts} cold starts", f"{result['init_ms']['median']} ms", "<= 15 ms",
         verdict(result["init_ms"]["median"] <= TARGETS["init_median_ms"])),
        (f"init, max of {starts}", f"{result['init_ms']['max']} ms", "", ""),
        ("peak RSS, cold start + one CreateImage", f"{result['peak_rss_mb']} MB", "<= 32 MB",
         verdict(result["peak_rss_mb"] <= TARGETS["peak_rss_mb"])),
        ("round-trip depth, 1 target region", str(one["depth"]), "<= 4", verdict(one["depth"] <= TARGETS["depth"])),
        ("round-trip depth, 5 target regions", str(five_s["depth"]), "<= 4", verdict(five_s["depth"] <= TARGETS["depth"])),
        ("mutating calls, duplicate delivery", str(dup["mutating"]), "0", verdict(dup["mutating"] == 0)),
        (f"peer: Python/boto3 handler init, median", f"{result['peer_boto3_init_ms']['median']} ms",
         "", f"{result['peer_ratio']}x ami-share's"),
    ]
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\n| scenario | answer | calls | mutating | depth | wall |")
    print("|---|---|---|---|---|---|")
    for s in scenarios:
        print(f"| {s['scenario']} | {s['answer']} | {s['calls']} | {s['mutating']} | {s['depth']} | {s['wall_ms']} ms |")
    print("\ncalls by operation:")
    for s in scenarios:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(s["by_operation"].items()))
        print(f"  {s['scenario']}: {ops}")
    print(f"\nwritten: {os.path.relpath(os.path.join(out_dir, 'results.json'), ROOT)}")


if __name__ == "__main__":
    main()
