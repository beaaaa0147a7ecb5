"""Driven by scripts/demo: see there. Talks only to the local emulator."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import boto3

REGION = "us-east-1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def show(ec2, image_id, title):
    image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    snapshot = image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    snap_tags = ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0].get("Tags", [])
    perms = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")["LaunchPermissions"]
    print(f"\n--- {title}: {image_id} ({image['Name']}) ---")
    print("  AMI tags:        ", {t["Key"]: t["Value"] for t in image.get("Tags", [])})
    print(f"  {snapshot} tags:", {t["Key"]: t["Value"] for t in snap_tags})
    print("  launch permissions:")
    for p in perms:
        print("    ", " ".join(f"{k}={v}" for k, v in p.items()))
    if not perms:
        print("     (none)")


def main():
    emulator = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests/emulator.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    endpoint = json.loads(emulator.stdout.readline())["endpoint"]
    print(f"emulated AWS (moto + tests/emulator.py fixes) at {endpoint}")
    env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION,
               AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true")
    watch = None
    try:
        request = urllib.request.Request(f"{endpoint}/_ami_share/organization", data=json.dumps({"ous": ["engineering", "data"]}).encode())
        org = json.loads(urllib.request.urlopen(request).read())
        print(f"organization {org['arn']}")
        for name, ou in org["ous"].items():
            print(f"  OU {name}: {ou['arn']}")

        ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint,
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
        image_id = ec2.create_image(InstanceId=instance, Name="golden-al2023-2026.11.25")["ImageId"]
        ec2.create_tags(Resources=[image_id], Tags=[{"Key": "stage", "Value": "release"}])

        config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        config.write(f"""# The demo's rules (the same form as config/ami-share.toml)
[[rule]]
name = "golden-images"
match.name = ["golden-*"]
match.tags = {{ stage = "release" }}
tags = {{ "ami-share:distributed" = "org", "cost-center" = "platform" }}
share.organizations = ["{org['arn']}"]

[[rule]]
name = "engineering-ou"
match.name = ["golden-*"]
share.organizational_units = ["{org['ous']['engineering']['arn']}"]
share.accounts = ["210987654321"]
""")
        config.close()
        print(f"\nconfig ({config.name}):\n" + open(config.name).read())

        show(ec2, image_id, "BEFORE")

        port = free_port()
        watch = subprocess.Popen(
            ["cargo", "lambda", "watch", "--ignore-changes", "--invoke-address", "127.0.0.1",
             "--invoke-port", str(port), "--env-var", f"AMI_SHARE_CONFIG={config.name}"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)

        with open(os.path.join(ROOT, "events/create-image.json")) as f:
            event = json.load(f)
        event["detail"]["responseElements"]["imageId"] = image_id
        event_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(event, event_file)
        event_file.close()

        for label in ["CreateImage event", "the same event again (EventBridge delivers at least once)"]:
            print(f"\n>>> cargo lambda invoke ami-share-lambda --data-file <events/create-image.json with {image_id}>  ({label})")
            out = subprocess.run(
                ["cargo", "lambda", "invoke", "ami-share-lambda", "--invoke-address", "127.0.0.1", "--invoke-port", str(port),
                 "--data-file", event_file.name],
                cwd=ROOT, env=env, capture_output=True, text=True, check=True,
            )
            answer = json.loads(out.stdout)
            outcome = answer.get("outcome", {})
            print(f"status: {answer['status']}; rules: {outcome.get('rules')}")
            for action in outcome.get("done", []):
                print("  done:", json.dumps(action))
            if not outcome.get("done"):
                print("  nothing to do: already as configured (no mutating call)")

        show(ec2, image_id, "AFTER")
    finally:
        if watch:
            watch.terminate()
            watch.wait(10)
        emulator.stdin.close()
        emulator.wait(10)


if __name__ == "__main__":
    main()
