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


def show_policy(kms, key_arn, title):
    policy = json.loads(kms.get_key_policy(KeyId=key_arn, PolicyName="default")["Policy"])
    print(f"\n--- {title}: key policy of {key_arn} ---")
    for statement in policy["Statement"]:
        print("    " + json.dumps(statement))


def show(ec2, image_id, title):
    image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    snapshot = image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    snap_tags = ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0].get("Tags", [])
    perms = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")["LaunchPermissions"]
    print(f"\n--- {title}: {image_id} ({image['Name']}) ---")
    print("  AMI tags:        ", {t["Key"]: t["Value"] for t in image.get("Tags", [])})
    snapshot_info = ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0]
    print(f"  {snapshot} encrypted:", snapshot_info["Encrypted"], snapshot_info.get("KmsKeyId", ""))
    print(f"  {snapshot} tags:", {t["Key"]: t["Value"] for t in snap_tags})
    print("  launch permissions:")
    for p in perms:
        print("    ", " ".join(f"{k}={v}" for k, v in p.items()))
    if not perms:
        print("     (none)")


def make_image(ec2, name, encryption=None):
    """CreateImage from a fresh instance whose root volume is encrypted as `encryption` says; tagged stage=release."""
    mappings = [{"DeviceName": "/dev/sda1", "Ebs": dict(VolumeSize=8, **encryption)}] if encryption else []
    instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, BlockDeviceMappings=mappings)
    image = ec2.create_image(InstanceId=instance["Instances"][0]["InstanceId"], Name=name)["ImageId"]
    ec2.create_tags(Resources=[image], Tags=[{"Key": "stage", "Value": "release"}])
    return image


def main():
    emulator = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests/emulator.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    endpoint = json.loads(emulator.stdout.readline())["endpoint"]
    print(f"emulated AWS (moto + tests/emulator.py fixes) at {endpoint}")
    # One function for the demo's three regions: it handles their (forwarded) events. (In the
    # environment, not --env-var, which splits values at commas.)
    env = dict(os.environ, AMI_SHARE_EVENT_REGIONS="us-west-2,eu-central-1",
               AWS_ENDPOINT_URL=endpoint, AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION,
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
        image_id = make_image(ec2, "golden-al2023-2026.11.25")

        config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        # The demo's rules, shared with tests/cli.rs (which plans every sample event against this state).
        with open(os.path.join(ROOT, "scripts/demo-config.toml")) as f:
            rules = f.read()
        rules = rules.replace("@ORG_ARN@", org["arn"]).replace("@ENGINEERING_OU_ARN@", org["ous"]["engineering"]["arn"])
        config.write(rules)
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

        def invoke(event_file, image, label, region=REGION):
            with open(os.path.join(ROOT, "events", event_file)) as f:
                event = json.load(f)
            event["region"] = region
            if "ImageId" in event["detail"]:
                event["detail"]["ImageId"] = image
                event["resources"] = [f"arn:aws:ec2:{region}::image/{image}"]
            else:
                event["detail"]["awsRegion"] = region
                event["detail"]["responseElements"]["imageId"] = image
            data = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
            json.dump(event, data)
            data.close()
            print(f"\n>>> cargo lambda invoke ami-share-lambda --data-file <events/{event_file} with {image}>  ({label})")
            out = subprocess.run(
                ["cargo", "lambda", "invoke", "ami-share-lambda", "--invoke-address", "127.0.0.1", "--invoke-port", str(port),
                 "--data-file", data.name],
                cwd=ROOT, env=env, capture_output=True, text=True,
            )
            if out.returncode != 0:
                print(f"the function failed (Lambda would retry the event):\n{out.stdout}{out.stderr}")
                return
            answer = json.loads(out.stdout)
            outcome = answer.get("outcome", {})
            print(f"status: {answer['status']}; image: {outcome.get('image_id')}; rules: {outcome.get('rules')}")
            if outcome.get("copy_of"):
                print(f"  (ami-share's copy of {outcome['copy_of']}: finished in its region under its source's rules)")
            for region, result in outcome.get("regions", {}).items():
                print(f"  region {region}: {result['status']} {result.get('image_id', '')} {result.get('detail', '')}")
            if outcome.get("event_image_id"):
                print(f"  (the event named {outcome['event_image_id']}, ami-share's re-encrypted copy: its source is reconciled)")
            for action in outcome.get("done", []):
                print("  done:", json.dumps(action))
            for reason in outcome.get("blocked", []):
                print("  not shared as it is:", reason)
            for reason in outcome.get("deferred", []):
                print("  deferred:", reason)
            if not outcome.get("done") and not outcome.get("blocked"):
                print("  nothing to do: already as configured (no mutating call)")

        print("\n=== 1. An unencrypted AMI ===")
        for label in ["CreateImage event", "the same event again (EventBridge delivers at least once)"]:
            invoke("create-image.json", image_id, label)
        show(ec2, image_id, "AFTER")

        print("\n=== 2. An AMI encrypted with a customer managed key ===")
        kms = boto3.client("kms", region_name=REGION, endpoint_url=endpoint,
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        # Its owner approves ami-share by tagging it (README, "Encrypted AMIs"): keys nobody approved are
        # never opened.
        key = kms.create_key(Description="golden images", Tags=[
            {"TagKey": "ami-share:manage-key-policy", "TagValue": "true"}])["KeyMetadata"]["Arn"]
        encrypted = make_image(ec2, "golden-al2023-encrypted-2026.11.25", {"Encrypted": True, "KmsKeyId": key})
        show(ec2, encrypted, "BEFORE")
        show_policy(kms, key, "BEFORE")
        invoke("create-image.json", encrypted, "CreateImage event")
        invoke("create-image.json", encrypted, "the same event again")
        show(ec2, encrypted, "AFTER")
        show_policy(kms, key, "AFTER")

        print("\n=== 3. An AMI encrypted with the AWS managed aws/ebs key ===")
        copy_key = kms.create_key(Description="re-encrypted copies for sharing")["KeyMetadata"]["Arn"]
        kms.create_alias(AliasName="alias/ami-share", TargetKeyId=copy_key)
        legacy = make_image(ec2, "golden-al2023-legacy-2026.11.25", {"Encrypted": True})
        invoke("create-image.json", legacy, "CreateImage event")
        show(ec2, legacy, "AFTER (the original: not shared, and why)")
        copy = ec2.describe_images(Owners=["self"], Filters=[{"Name": "tag:ami-share:source-image", "Values": [legacy]}])["Images"][0]["ImageId"]
        invoke("copy-image.json", copy, "the copy's own CopyImage event, while it is pending")
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/_ami_share/image-state", data=json.dumps(
            {"region": REGION, "image_id": copy, "state": "available"}).encode()))
        invoke("ami-state-available.json", copy, "the copy is available")
        show(ec2, copy, "AFTER (the re-encrypted copy: shared)")
        show_policy(kms, copy_key, "AFTER")

        print("\n=== 4. An AMI distributed to two more regions ===")
        def client(service, region):
            return boto3.client(service, region_name=region, endpoint_url=endpoint,
                                aws_access_key_id="testing", aws_secret_access_key="testing")
        west_key = client("kms", "us-west-2").create_key(Description="AMI copies in us-west-2")["KeyMetadata"]["Arn"]
        client("kms", "us-west-2").create_alias(AliasName="alias/ami-share", TargetKeyId=west_key)
        regional = make_image(ec2, "regional-al2023-2026.11.25")
        invoke("ami-state-available.json", regional, "the AMI is available: copied to both regions at once")
        for region in ["us-west-2", "eu-central-1"]:
            regional_ec2 = client("ec2", region)
            found = regional_ec2.describe_images(Owners=["self"], Filters=[
                {"Name": "tag:ami-share:source-image", "Values": [regional]}])["Images"]
            copy = found[0]["ImageId"]
            invoke("copy-image.json", copy, f"the copy's CopyImage event in {region}, while pending (no copy of a copy)", region)
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/_ami_share/image-state", data=json.dumps(
                {"region": region, "image_id": copy, "state": "available"}).encode()))
            invoke("ami-state-available.json", copy, f"the copy is available in {region}", region)
            show(regional_ec2, copy, f"AFTER (the copy in {region})")
            latest = client("ssm", region).get_parameter(Name="/ami-share/regional/latest")["Parameter"]["Value"]
            print(f"  SSM /ami-share/regional/latest in {region}: {latest}")
        show_policy(client("kms", "us-west-2"), west_key, "AFTER (the us-west-2 key)")
        invoke("ami-state-available.json", regional, "the source's event again: nothing left anywhere")
    finally:
        if watch:
            watch.terminate()
            watch.wait(10)
        emulator.stdin.close()
        emulator.wait(10)


if __name__ == "__main__":
    main()
