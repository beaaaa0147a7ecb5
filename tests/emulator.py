#!/usr/bin/env python3
"""The AWS emulator for ami-share's tests and demo: moto, in this process, with its gaps closed.

Starts moto's ThreadedMotoServer on a free loopback port and prints one JSON line to stdout:
    {"endpoint": "http://127.0.0.1:PORT"}
then serves until stdin closes (the test that started it ended) or SIGTERM/SIGINT.

Running moto in this process (not as `moto_server`) lets us adjust its backend where it differs from AWS on
the paths ami-share depends on (launch-permission validation, pending images, DescribeImages owners,
the SourceImageId/SourceInstanceId that tell how an image was made, encrypted snapshots and their KMS keys,
CopyImage, key policy validation). Each fix below is small, named after the AWS behaviour it reproduces, and
shown by a test in tests/emulator_fidelity.rs. A test that passes only because moto is lax proves nothing.

Test-only control endpoints (never part of any AWS API), under /_ami_share/:
    POST /_ami_share/organization {"ous": ["eng", ...]}  create the organization (once) and OUs under the root
    POST /_ami_share/image-state  {"region", "image_id", "state"}      set an image's state (e.g. "pending")
    POST /_ami_share/image-owner  {"region", "image_id", "owner_id"}   make an image another account's
    POST /_ami_share/key-policy-race {"region", "key_id", "writes"}     simulate a concurrent writer: each of
         the next `writes` PutKeyPolicy calls on the key is overwritten, right after, by the policy the key had
         before it (as a writer that read the policy earlier and wrote it later would)
    POST /_ami_share/key-policy-edit {"region", "key_id", "statement"}   simulate an operator's edit: right
         after the next GetKeyPolicy of the key is answered, `statement` is appended to its policy
    GET  /_ami_share/key-policy-writes                                   every PutKeyPolicy so far: key and
         whether it set BypassPolicyLockoutSafetyCheck
    POST /_ami_share/faults {"fraction", "seed", "access_key"}          answer that fraction of the AWS
         requests signed with `access_key` (chosen by a generator seeded with `seed`) with the service's own
         throttling error instead of serving them; fraction 0: serve all again
    POST /_ami_share/broken-answer {"action", "kind"}                    answer every `action` request with a
         body the SDK cannot read: "html-500" (moto's own answer to what it does not implement: HTTP 500
         and an HTML page) or "cut-xml" (HTTP 200, XML cut off mid-element); kind null: serve it again
    GET  /_ami_share/requests                                           every AWS request so far; a request
         answered by a fault or a broken answer (never served by moto) has "fault" set
"""

import copy
import fnmatch
import io
import json
import random
import re
import signal
import sys
import threading
import time
import urllib.parse
from datetime import datetime, timedelta, timezone

import boto3

# Speed, before moto is imported: moto asks a new boto3 Session for the list of regions of each service
# it loads (EC2 alone asks three times as it is imported), and each new Session parses botocore's
# endpoint files again, about half a second of every emulator's start. One Session answers them all.
_RealSession = boto3.Session
_shared_session = _RealSession()
boto3.Session = lambda *args, **kwargs: _shared_session if not (args or kwargs) else _RealSession(*args, **kwargs)

from moto.core import responses as moto_responses  # noqa: E402 (moto after the Session above)
from moto.core import utils as moto_utils
from moto.core.exceptions import JsonRESTError
from moto.core.responses import ActionResult
from moto.ec2.exceptions import EC2ClientError, InvalidAMIIdError, UnvailableAMIIdError
from moto.ec2.models import ec2_backends
from moto.ec2.models.amis import Ami, AmiBackend
from moto.ec2.models.elastic_block_store import EBSBackend
from moto.ec2.responses.amis import AmisResponse
from moto.kms.models import KmsBackend, kms_backends
from moto.kms.responses import KmsResponse
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, make_server

ACCOUNT = "123456789012"

# --- AWS-fidelity fixes ------------------------------------------------------------------------------


class InvalidParameter(EC2ClientError):
    def __init__(self, message):
        super().__init__("InvalidParameter", message)


class InvalidAMIAttributeItemValue(EC2ClientError):
    def __init__(self, message):
        super().__init__("InvalidAMIAttributeItemValue", message)


ORG_ID = r"o-[a-z0-9]{10,32}"
OU_ID = r"ou-[0-9a-z]{4,32}-[a-z0-9]{8,32}"
ARN_HEAD = r"arn:aws(?:-cn|-us-gov)?:organizations::\d{12}:"
ORG_ARN = re.compile(f"^{ARN_HEAD}organization/{ORG_ID}$")
OU_ARN = re.compile(f"^{ARN_HEAD}ou/{ORG_ID}/{OU_ID}$")


def check_organization_targets(permissions):
    """AWS: launch permissions name organizations and OUs by full ARN. A bare o-/ou- id or a non-ARN is an
    InvalidParameter; an ARN of the wrong form is an InvalidAMIAttributeItemValue. moto accepts anything."""
    for perm in permissions:
        for key, pattern in (("OrganizationArn", ORG_ARN), ("OrganizationalUnitArn", OU_ARN)):
            value = perm.get(key)
            if value is None:
                continue
            if not value.startswith("arn:"):
                raise InvalidParameter(f"Invalid {key} '{value}'. Specify the full ARN, not an ID.")
            if not pattern.match(value):
                raise InvalidAMIAttributeItemValue(
                    f'Invalid attribute item value "{value}" for {key} item type.'
                )


_modify_image_attribute = AmiBackend.modify_image_attribute


_image_block_public_access = {}


def modify_image_attribute(self, ami_id, launch_permissions_to_add, launch_permissions_to_remove):
    """AWS refuses to change launch permissions of an image that is not available (moto's images are always
    available, so it never had to), and validates organization/OU ARNs. AWS never makes an image with
    encrypted snapshots public, nor any image while image block public access is on; moto does both."""
    ami = self.describe_images(ami_ids=[ami_id])[0]
    if ami.state != "available":
        raise UnvailableAMIIdError(ami_id)
    if any(p.get("Group") == "all" for p in launch_permissions_to_add):
        if ami.ebs_snapshot is not None and ami.ebs_snapshot.encrypted:
            raise EC2ClientError("InvalidParameter", "Encrypted snapshots cannot be made public.")
        if _image_block_public_access.get((self.account_id, self.region_name)) == "block-new-sharing":
            raise EC2ClientError(
                "OperationNotPermitted",
                "You can't publicly share this image because block public access for AMIs is enabled for this account.",
            )
    check_organization_targets(launch_permissions_to_add)
    check_organization_targets(launch_permissions_to_remove)
    return _modify_image_attribute(self, ami_id, launch_permissions_to_add, launch_permissions_to_remove)


_describe_images = AmiBackend.describe_images


def describe_images(self, ami_ids=None, filters=None, exec_users=None, owners=None):
    """AWS applies Owners together with ImageIds; moto ignores Owners (and filters) when ImageIds are given.
    AWS also lists, by id, another account's image whose launch permissions admit the caller (its account,
    its organization or OU, or everyone), unless the caller's Allowed AMIs criteria hide it, and reports
    ImageAllowed while Allowed AMIs is on; moto knows only the caller's own images."""
    foreign = []
    if ami_ids:
        foreign = [s for s in (shared_with(self, i) for i in ami_ids if i not in self.amis) if s is not None]
        listed = [self.account_id if o == "self" else o for o in owners or []]
        foreign = [i for i in foreign if not listed or i.owner_id in listed]
        wanted, ami_ids = ami_ids, [i for i in ami_ids if i in self.amis]
        if not ami_ids:
            if not foreign:
                raise InvalidAMIIdError(wanted)
            return foreign
    images = _describe_images(self, ami_ids=ami_ids, filters=filters, exec_users=exec_users, owners=owners)
    if ami_ids and owners:
        owners = [self.account_id if o == "self" else o for o in owners]
        images = [i for i in images if i.owner_id in owners or i.owner_alias in owners]
    return images + foreign


# account -> {"org": organization id, "ous": [OU ids from the root down]}: the emulator's organization.
_org_members = {}


def admitted_by(permissions, account):
    """Whether launch permissions admit `account` (AWS: its id, its organization's ARN, an OU ARN on its
    path, or everyone)."""
    member = _org_members.get(account, {})
    for p in permissions:
        if p.get("Group") == "all" or p.get("UserId") == account:
            return True
        org_arn = p.get("OrganizationArn", "")
        if member and org_arn.endswith(f"organization/{member['org']}"):
            return True
        ou_arn = p.get("OrganizationalUnitArn", "")
        if member and any(ou_arn.endswith(f"/{member['org']}/{ou}") for ou in member["ous"]):
            return True
    return False


def shared_with(backend, image_id):
    """Another account's image `image_id` in this region, as the caller sees it, or None."""
    caller = backend.account_id
    for account, regions in list(ec2_backends.items()):
        if account == caller or backend.region_name not in regions:
            continue
        image = regions[backend.region_name].amis.get(image_id)
        if image is None or not admitted_by(image.launch_permissions, caller):
            continue
        settings = _allowed_images.get((caller, backend.region_name), {"state": "disabled"})
        if settings["state"] == "disabled":
            return image
        allowed = image_allowed(settings.get("criteria", []), image)
        if settings["state"] == "enabled" and not allowed:
            return None
        seen = copy.copy(image)
        seen.image_allowed = allowed
        return seen
    return None


# (account, region) -> {"state": ..., "criteria": [ImageCriterion dicts]}
_allowed_images = {}


def image_allowed(criteria, image):
    """Allowed AMIs: an image is allowed when one criterion matches, each criterion's parameters all
    matching (image providers, names with * and ?, creation-date and deprecation-time conditions)."""
    now = datetime.now(timezone.utc)

    def parsed(value):
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None

    for criterion in criteria:
        providers = criterion.get("ImageProviders") or []
        if providers and image.owner_id not in providers and getattr(image, "owner_alias", None) not in providers:
            continue
        names = criterion.get("ImageNames") or []
        # AWS's wildcards are * and ? only: a [ is a character like any other.
        if names and not any(fnmatch.fnmatchcase(image.name or "", n.replace("[", "[[]")) for n in names):
            continue
        created = (criterion.get("CreationDateCondition") or {}).get("MaximumDaysSinceCreated")
        creation = parsed(getattr(image, "creation_date", None))
        if created is not None and (creation is None or (now - creation).days > int(created)):
            continue
        deprecated = (criterion.get("DeprecationTimeCondition") or {}).get("MaximumDaysSinceDeprecated")
        deprecation = parsed(getattr(image, "deprecation_time", None))
        if deprecated is not None and deprecation and deprecation <= now and (now - deprecation).days > int(deprecated):
            continue
        return True
    return False


def get_allowed_images_settings_response(self):
    """AWS GetAllowedImagesSettings (moto: not implemented): disabled until enabled."""
    settings = _allowed_images.get((self.current_account, self.region), {"state": "disabled", "criteria": []})
    return ActionResult(
        {"State": settings["state"], "ImageCriteria": settings.get("criteria", []), "ManagedBy": "account"}
    )


def enable_allowed_images_settings_response(self):
    """AWS EnableAllowedImagesSettings: `enabled` or `audit-mode`."""
    state = self._get_param("AllowedImagesSettingsState")
    self.error_on_dryrun()
    _allowed_images.setdefault((self.current_account, self.region), {"criteria": []})["state"] = state
    return ActionResult({"AllowedImagesSettingsState": state})


def replace_image_criteria_in_allowed_images_settings_response(self):
    """AWS ReplaceImageCriteriaInAllowedImagesSettings: the criteria, whatever the state."""
    criteria = self._get_param("ImageCriteria", []) or []
    self.error_on_dryrun()
    _allowed_images.setdefault((self.current_account, self.region), {"state": "disabled"})["criteria"] = criteria
    return ActionResult({"ReturnValue": True})


_copy_image = AmiBackend.copy_image


def copy_image(self, source_image_id, source_region, name=None, description=None):
    """AWS records SourceImageId and SourceImageRegion on a copy (DescribeImages shows them); moto does not."""
    ami = _copy_image(self, source_image_id, source_region, name, description)
    ami.source_image_id = source_image_id
    ami.source_image_region = source_region
    return ami


_create_image = AmiBackend.create_image


def create_image(self, instance_id, name, description, tag_specifications):
    """AWS records the instance's AMI as SourceImageId on an image made by CreateImage (beside
    SourceInstanceId); moto records only the instance."""
    ami = _create_image(self, instance_id, name, description, tag_specifications)
    ami.source_image_id = self.get_instance(instance_id).image_id
    return ami


_create_snapshot = EBSBackend.create_snapshot


def create_snapshot(self, volume_id, description, owner_id=None, from_ami=None):
    """AWS: a snapshot of an encrypted volume is encrypted with the volume's KMS key. moto keeps the flag and
    drops the key."""
    snapshot = _create_snapshot(self, volume_id, description, owner_id=owner_id, from_ami=from_ami)
    key = self.get_volume(volume_id).kms_key_id
    # AWS reports the key as its ARN, however the volume's key was named.
    snapshot.kms_key_id = kms_backends[self.account_id][self.region_name].describe_key(key).arn if key else None
    return snapshot


def create_image_from_the_instance_root_volume(self, instance_id, name, description, tag_specifications):
    """AWS: CreateImage snapshots the instance's volumes, so the image's snapshot is encrypted as the root
    volume is, with its key. moto gives every image a fresh unencrypted snapshot."""
    ami = create_image(self, instance_id, name, description, tag_specifications)
    instance = self.get_instance(instance_id)
    root = instance.block_device_mapping.get(instance.root_device_name)
    if root is not None:
        volume = self.get_volume(root.volume_id)
        ami.ebs_snapshot.encrypted = bool(volume.encrypted)
        ami.ebs_snapshot.kms_key_id = volume.kms_key_id if volume.encrypted else None
    return ami


def block_device_mappings(self):
    """AWS: DescribeImages reports whether each EBS snapshot is encrypted (Ebs.Encrypted) and, if so, with
    which key (Ebs.KmsKeyId, the key's ARN); moto reports neither."""
    ebs = {
        "SnapshotId": self.ebs_snapshot.id,
        "VolumeSize": 15,
        "DeleteOnTermination": False,
        "VolumeType": "standard",
        "Encrypted": bool(self.ebs_snapshot.encrypted),
    }
    if self.ebs_snapshot.encrypted and self.ebs_snapshot.kms_key_id:
        ebs["KmsKeyId"] = self.ebs_snapshot.kms_key_id
    return [{"DeviceName": self.root_device_name, "Ebs": ebs}]


_client_tokens = {}
# AWS makes a ClientToken's check and the copy one step: requests with one token at the same moment still
# make one copy. (The threaded server runs requests concurrently.)
_copy_lock = threading.Lock()


def copy_image_response(self):
    with _copy_lock:
        return _copy_image_response(self)


def _copy_image_response(self):
    """AWS CopyImage: the copy is `pending` at first; Encrypted+KmsKeyId encrypt its snapshots with that key
    (Encrypted alone: the account's default EBS key; neither: as the source; KmsKeyId without Encrypted is
    refused); TagSpecifications tag the new image and snapshots; the same ClientToken returns the same copy,
    and is refused with other parameters; AMI names are unique in an account and region. moto: an
    unencrypted copy, available at once, untagged, a new one per call, any name."""
    source_image_id = self._get_param("SourceImageId")
    source_region = self._get_param("SourceRegion")
    name = self._get_param("Name")
    token = self._get_param("ClientToken")
    kms_key_id = self._get_param("KmsKeyId")
    encrypt = self._get_bool_param("Encrypted", False)
    self.error_on_dryrun()
    if kms_key_id and not encrypt:
        raise EC2ClientError("InvalidParameterDependency", "The parameter KmsKeyId requires the parameter Encrypted.")
    request = json.dumps(
        [source_image_id, source_region, name, kms_key_id, encrypt, self._get_param("TagSpecifications", [])],
        sort_keys=True,
    )
    seen = (self.current_account, self.region, token)
    if token and seen in _client_tokens:
        image_id, earlier = _client_tokens[seen]
        if earlier != request:
            raise EC2ClientError(
                "IdempotentParameterMismatch", "The client token was already used with other parameters."
            )
        return ActionResult({"ImageId": image_id})
    taken = [a.id for a in self.ec2_backend.amis.values() if a.name == name and a.owner_id == self.current_account]
    if taken:
        raise EC2ClientError("InvalidAMIName.Duplicate", f"AMI name {name} is already in use by AMI {taken[0]}")
    image = self.ec2_backend.copy_image(source_image_id, source_region, name, self._get_param("Description"))
    source = ec2_backends[self.current_account][source_region].amis[source_image_id].ebs_snapshot
    if kms_key_id:
        key_arn = kms_backends[self.current_account][self.region].describe_key(kms_key_id).arn
        encrypted = True
    elif encrypt:
        key_arn = self.ec2_backend.default_kms_key_id or self.ec2_backend._create_default_encryption_key()
        encrypted = True
    elif source.encrypted and source_region != self.region:
        # AWS: KMS keys are regional; an encrypted source copied to another region without a key is
        # encrypted with the destination's default EBS key. (moto kept the source region's key.)
        key_arn = self.ec2_backend.default_kms_key_id or self.ec2_backend._create_default_encryption_key()
        encrypted = True
    else:
        encrypted, key_arn = source.encrypted, source.kms_key_id
    image.ebs_snapshot.encrypted = bool(encrypted)
    image.ebs_snapshot.kms_key_id = key_arn if encrypted else None
    for spec in self._get_param("TagSpecifications", []):
        target = {"image": image, "snapshot": image.ebs_snapshot}[spec["ResourceType"]]
        for tag in spec.get("Tags", []):
            target.add_tag(tag["Key"], tag["Value"])
    image.state = "pending"
    if token:
        _client_tokens[seen] = (image.id, request)
    return ActionResult({"ImageId": image.id})


def register_image_response(self):
    """AWS RegisterImage makes the AMI of the snapshot its root device mapping names (several AMIs may share
    one snapshot); moto gives every registered image a fresh snapshot of its own."""
    mappings = self._get_param("BlockDeviceMappings", []) or []
    self.error_on_dryrun()
    image = self.ec2_backend.register_image(self._get_param("Name"), self._get_param("Description", ""))
    snapshot_id = next((m.get("Ebs", {}).get("SnapshotId") for m in mappings if m.get("Ebs", {}).get("SnapshotId")), None)
    if snapshot_id:
        auto = image.ebs_snapshot
        image.ebs_snapshot = self.ec2_backend.get_snapshot(snapshot_id)
        self.ec2_backend.snapshots.pop(auto.id, None)
    return ActionResult({"ImageId": image.id})


_ami_filter_value = Ami.get_filter_value


def ami_filter_value(self, filter_name, method_name=None):
    """AWS DescribeImages filters by block-device-mapping.snapshot-id (the images a snapshot backs); moto
    does not know the filter."""
    if filter_name == "block-device-mapping.snapshot-id":
        return self.ebs_snapshot.id
    return _ami_filter_value(self, filter_name, method_name)


def get_image_block_public_access_state_response(self):
    """AWS GetImageBlockPublicAccessState: `unblocked` or `block-new-sharing` (new accounts: blocked).
    moto: HTTP 500, not implemented. The emulator starts unblocked, as moto's images are."""
    state = _image_block_public_access.get((self.current_account, self.region), "unblocked")
    return ActionResult({"ImageBlockPublicAccessState": state})


def enable_image_block_public_access_response(self):
    """AWS EnableImageBlockPublicAccess (moto: HTTP 500)."""
    _image_block_public_access[(self.current_account, self.region)] = "block-new-sharing"
    return ActionResult({"ImageBlockPublicAccessState": "block-new-sharing"})


def enable_image_deprecation_response(self):
    """AWS EnableImageDeprecation: DescribeImages then reports DeprecationTime, rounded to the minute; only
    the owner may deprecate; not in the past, at most 10 years ahead. moto: HTTP 500, not implemented."""
    image_id = self._get_param("ImageId")
    at = self._get_param("DeprecateAt")  # moto parses timestamps by the API's shape
    if isinstance(at, str):
        at = datetime.fromisoformat(at.replace("Z", "+00:00"))
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    self.error_on_dryrun()
    image = self.ec2_backend.describe_images(ami_ids=[image_id])[0]
    if image.owner_id != self.current_account:
        raise EC2ClientError("AuthFailure", f"Not authorized for image:{image_id}")
    if at < datetime.now(timezone.utc):
        raise EC2ClientError("InvalidParameterValue", "You can't specify a date in the past for DeprecateAt.")
    if at > datetime.now(timezone.utc) + timedelta(days=3653):
        raise EC2ClientError("InvalidParameterValue", "DeprecateAt can be at most 10 years in the future")
    rounded = (at + timedelta(seconds=30)).replace(second=0, microsecond=0)
    image.deprecation_time = rounded.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return ActionResult({"Return": True})


def enable_image_deregistration_protection_response(self):
    """AWS EnableImageDeregistrationProtection: DescribeImages then reports DeregistrationProtection
    (`enabled-with-cooldown` with WithCooldown, else `enabled-without-cooldown`), and DeregisterImage
    refuses the image until it is turned off (and, with the cooldown, for 24 hours after); only the owner
    may. moto: not implemented."""
    image_id = self._get_param("ImageId")
    cooldown = self._get_bool_param("WithCooldown", False)
    self.error_on_dryrun()
    image = self.ec2_backend.describe_images(ami_ids=[image_id])[0]
    if image.owner_id != self.current_account:
        raise EC2ClientError("AuthFailure", f"Not authorized for image:{image_id}")
    image.deregistration_protection = "enabled-with-cooldown" if cooldown else "enabled-without-cooldown"
    return ActionResult({"Return": "true"})


def disable_image_deregistration_protection_response(self):
    """AWS DisableImageDeregistrationProtection: off at once, or 24 hours later when it was turned on
    with the cooldown (DescribeImages: `disabled` meanwhile, and DeregisterImage still refuses)."""
    image_id = self._get_param("ImageId")
    self.error_on_dryrun()
    image = self.ec2_backend.describe_images(ami_ids=[image_id])[0]
    if image.owner_id != self.current_account:
        raise EC2ClientError("AuthFailure", f"Not authorized for image:{image_id}")
    if getattr(image, "deregistration_protection", None) == "enabled-with-cooldown":
        image.protected_until = datetime.now(timezone.utc) + timedelta(hours=24)
    image.deregistration_protection = "disabled"
    return ActionResult({"Return": "true"})


_deregister_image = AmiBackend.deregister_image


def deregister_image(self, ami_id):
    """AWS refuses to deregister a protected AMI (moto has no protection)."""
    image = self.amis.get(ami_id)
    protected = getattr(image, "deregistration_protection", "disabled").startswith("enabled")
    cooling = getattr(image, "protected_until", None)
    if protected or (cooling and cooling > datetime.now(timezone.utc)):
        raise EC2ClientError(
            "InvalidParameterValue",
            f"The AMI {ami_id} has deregistration protection enabled. Disable it to deregister the AMI.",
        )
    return _deregister_image(self, ami_id)


_describe_key = KmsResponse.describe_key


def describe_key(self):
    """AWS KMS, for a key of another account named by its ARN, evaluates the key policy for the caller
    (moto looks for the key among the caller's own and answers NotFoundException). The subset evaluated:
    Allow statements naming kms:DescribeKey (or kms:*), the principal `*` or the caller's account, and the
    conditions aws:PrincipalOrgID, aws:PrincipalOrgPaths and aws:PrincipalAccount; any other condition
    (kms:ViaService, which a direct call never carries) leaves the statement out."""
    key_id = self._get_param("KeyId")
    parts = key_id.split(":") if key_id.startswith("arn:") else []
    if len(parts) < 6 or parts[4] == self.current_account:
        return _describe_key(self)
    owner, region = parts[4], parts[3]
    backend = kms_backends[owner][region]
    try:
        key = backend.describe_key(backend.get_key_id(key_id))
    except Exception:
        raise JsonRESTError("NotFoundException", f"Key '{key_id}' does not exist")
    if not key_policy_admits(json.loads(key.policy), self.current_account, "kms:DescribeKey"):
        raise JsonRESTError(
            "AccessDeniedException",
            f"User: arn:aws:sts::{self.current_account}:assumed-role/receiver/check is not authorized to "
            f"perform: kms:DescribeKey on resource: {key_id} because no resource-based policy allows the "
            "kms:DescribeKey action",
        )
    return json.dumps(key.to_dict())


def key_policy_admits(policy, account, action):
    member = _org_members.get(account, {})
    context = {
        "aws:principalorgid": [member["org"]] if member else [],
        "aws:principalorgpaths": [member["path"]] if member else [],
        "aws:principalaccount": [account],
    }
    statements = policy.get("Statement", [])
    for s in statements if isinstance(statements, list) else [statements]:
        actions = s.get("Action", [])
        actions = [actions] if isinstance(actions, str) else actions
        principal = s.get("Principal", {})
        aws = principal.get("AWS", []) if isinstance(principal, dict) else principal
        aws = [aws] if isinstance(aws, str) else aws
        if s.get("Effect") != "Allow" or not any(fnmatch.fnmatchcase(action, a) for a in actions):
            continue
        if not any(p in ("*", account, f"arn:aws:iam::{account}:root") for p in aws):
            continue
        if all(condition_holds(op, values, context) for op, values in s.get("Condition", {}).items()):
            return True
    return False


def condition_holds(operator, values, context):
    for key, wanted in values.items():
        wanted = [wanted] if isinstance(wanted, str) else wanted
        have = context.get(key.lower())
        if have is None:
            return False
        if operator in ("StringEquals", "ForAnyValue:StringEquals"):
            if not any(h in wanted for h in have):
                return False
        elif operator in ("StringLike", "ForAnyValue:StringLike"):
            if not any(fnmatch.fnmatchcase(h, w) for h in have for w in wanted):
                return False
        else:
            return False
    return True


_create_alias = KmsBackend.create_alias


def create_alias(self, target_key_id, alias_name):
    """AWS: a key behind an `alias/aws/…` alias (aws/ebs, made on first use) is AWS managed
    (KeyManager AWS). moto reports every key as CUSTOMER."""
    alias = _create_alias(self, target_key_id, alias_name)
    if alias_name.startswith("alias/aws/"):
        self.keys[self.get_key_id(target_key_id)].key_manager = "AWS"
    return alias


MAX_KEY_POLICY_BYTES = 32 * 1024
_put_key_policy = KmsResponse.put_key_policy
_key_policy_races = {}


_key_policy_writes = []


def lets_the_account_manage_the_key(document, account):
    """Whether a key policy still lets the key's account change it: an Allow statement, without conditions,
    for the account (its root, as KMS's default policy names it), with kms:* or kms:PutKeyPolicy. KMS's
    lockout safety check asks that of the caller; the account root is the form every policy ami-share
    writes keeps (it never changes a statement it does not own)."""
    statements = document.get("Statement", [])
    if isinstance(statements, dict):
        statements = [statements]
    for statement in statements:
        if not isinstance(statement, dict) or statement.get("Effect") != "Allow" or statement.get("Condition"):
            continue
        principal = statement.get("Principal")
        principals = principal.get("AWS") if isinstance(principal, dict) else principal
        principals = principals if isinstance(principals, list) else [principals]
        actions = statement.get("Action")
        actions = actions if isinstance(actions, list) else [actions]
        if {f"arn:aws:iam::{account}:root", account} & set(principals) and {"kms:*", "kms:PutKeyPolicy"} & set(actions):
            return True
    return False


def put_key_policy(self):
    """AWS PutKeyPolicy refuses a document that is not JSON (MalformedPolicyDocumentException) or over the
    32 KB key policy quota (LimitExceededException), and, unless BypassPolicyLockoutSafetyCheck is true, one
    that would no longer let the caller change the key's policy (the lockout safety check,
    MalformedPolicyDocumentException); moto stores anything."""
    policy = self._get_param("Policy")
    bypass = bool(self._get_param("BypassPolicyLockoutSafetyCheck"))
    try:
        document = json.loads(policy)
    except (TypeError, ValueError):
        raise JsonRESTError("MalformedPolicyDocumentException", "The new key policy is not valid JSON.")
    if len(policy.encode()) > MAX_KEY_POLICY_BYTES:
        raise JsonRESTError("LimitExceededException", "The key policy exceeds the maximum size of 32 KB.")
    _key_policy_writes.append({"key_id": self._get_param("KeyId"), "bypass": bypass})
    if not bypass and not lets_the_account_manage_the_key(document, self.current_account):
        raise JsonRESTError(
            "MalformedPolicyDocumentException",
            "The new key policy will not allow you to update the key policy in the future.",
        )
    backend = kms_backends[self.current_account][self.region]
    key = backend.keys[backend.get_key_id(self._get_param("KeyId"))]
    before = key.policy
    result = _put_key_policy(self)
    race = (self.current_account, self.region, key.id)
    if _key_policy_races.get(race, 0) > 0:
        _key_policy_races[race] -= 1
        key.policy = before
    return result


_get_key_policy = KmsResponse.get_key_policy
_key_policy_edits = {}


def get_key_policy(self):
    """Unchanged AWS behaviour; only serves the test control key-policy-edit (see the module doc)."""
    result = _get_key_policy(self)
    backend = kms_backends[self.current_account][self.region]
    key = backend.keys[backend.get_key_id(self._get_param("KeyId"))]
    statement = _key_policy_edits.pop((self.current_account, self.region, key.id), None)
    if statement is not None:
        policy = json.loads(key.policy)
        policy["Statement"].append(statement)
        key.policy = json.dumps(policy)
    return result


AmiBackend.create_image = create_image_from_the_instance_root_volume
AmiBackend.modify_image_attribute = modify_image_attribute
AmiBackend.describe_images = describe_images
AmiBackend.copy_image = copy_image
EBSBackend.create_snapshot = create_snapshot
Ami.block_device_mappings = property(block_device_mappings)
AmisResponse.copy_image = copy_image_response
AmisResponse.register_image = register_image_response
Ami.get_filter_value = ami_filter_value
AmisResponse.enable_image_deprecation = enable_image_deprecation_response
AmisResponse.get_allowed_images_settings = get_allowed_images_settings_response
AmisResponse.enable_allowed_images_settings = enable_allowed_images_settings_response
AmisResponse.replace_image_criteria_in_allowed_images_settings = replace_image_criteria_in_allowed_images_settings_response
AmisResponse.enable_image_deregistration_protection = enable_image_deregistration_protection_response
AmisResponse.disable_image_deregistration_protection = disable_image_deregistration_protection_response
AmiBackend.deregister_image = deregister_image
AmisResponse.get_image_block_public_access_state = get_image_block_public_access_state_response
AmisResponse.enable_image_block_public_access = enable_image_block_public_access_response
KmsBackend.create_alias = create_alias
KmsResponse.describe_key = describe_key
KmsResponse.put_key_policy = put_key_policy
KmsResponse.get_key_policy = get_key_policy

# --- speed (not fidelity) ----------------------------------------------------------------------------
# moto parses a service's botocore model (EC2's takes ~0.25 s) on its first request, cached, but every
# request that arrives before the first parse ends parses it again: a sweep's first fan-out of concurrent
# requests parsed EC2's model once per request. One parse per service, the others wait for it.
_service_models = {}
_service_models_lock = threading.Lock()
_parse_service_model = moto_responses.get_service_model


def _service_model_once(service_name):
    model = _service_models.get(service_name)
    if model is None:
        with _service_models_lock:
            model = _service_models.get(service_name)
            if model is None:
                model = _service_models[service_name] = _parse_service_model(service_name)
    return model


moto_responses.get_service_model = moto_utils.get_service_model = _service_model_once


# --- test control and request log --------------------------------------------------------------------

CREDENTIAL_SCOPE = re.compile(r"Credential=([^/]+)/\d{8}/([^/]+)/([^/]+)/aws4_request")


class Emulator:
    def __init__(self):
        self.requests = []
        self.latency = 0.0
        # region -> (HTTP status, EC2 error code, message): every EC2 call there is refused.
        self.refusals = {}
        # (fraction, random.Random, access key): requests signed with that key answered with a throttling
        # error.
        self.faults = (0.0, random.Random(0), None)
        # action -> kind of unreadable answer.
        self.broken = {}
        self.lock = threading.Lock()
        self.endpoint = None
        self.moto = DomainDispatcherApplication(create_backend_app)

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_ami_share/"):
            return self.control(environ, start_response, path[len("/_ami_share/"):])
        entry = self.record(environ)
        refusal = self.refusals.get(entry["region"])
        if refusal and entry["service"] == "ec2":
            entry["end"] = time.monotonic()
            entry["fault"] = refusal[1]
            return self.refuse(start_response, *refusal)
        fraction, rng, access_key = self.faults
        with self.lock:
            throttle = fraction > 0 and entry["access_key"] == access_key and rng.random() < fraction
        if throttle:
            entry["end"] = time.monotonic()
            entry["fault"] = "throttled"
            return self.throttle(start_response, entry["service"])
        kind = self.broken.get(entry["action"])
        if kind:
            entry["end"] = time.monotonic()
            entry["fault"] = kind
            return self.broken_answer(start_response, kind)
        if self.latency:
            # A fixed delay per request, as a real network has: calls made one after another then take
            # visibly longer than calls made together, so the log shows how deep the chain of calls is.
            time.sleep(self.latency)
        body = list(self.moto(environ, start_response))
        entry["end"] = time.monotonic()
        return body

    def record(self, environ):
        """Log the service, region and operation of an AWS request (query protocol: Action in the body;
        JSON protocol: X-Amz-Target), then hand the body back untouched."""
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        scope = CREDENTIAL_SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
        access_key, region, service = scope.groups() if scope else (None, None, None)
        target = environ.get("HTTP_X_AMZ_TARGET")
        if target:
            action = target.split(".")[-1]
        else:
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
            action = (form.get("Action") or [None])[0]
        entry = {"service": service, "region": region, "action": action, "access_key": access_key,
                 "start": time.monotonic()}
        with self.lock:
            self.requests.append(entry)
        return entry

    def control(self, environ, start_response, what):
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            args = json.loads(environ["wsgi.input"].read(length) or b"{}")
            result = getattr(self, "control_" + what.replace("-", "_"))(**args)
            status, body = "200 OK", result
        except Exception as e:  # a test's mistake: answer it, don't crash the emulator
            status, body = "400 Bad Request", {"error": f"{type(e).__name__}: {e}"}
        data = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    def control_requests(self):
        with self.lock:
            return list(self.requests)

    def refuse(self, start_response, status, code, message):
        body = (
            f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>"
            f"<Message>{message}</Message></Error></Errors><RequestID>ami-share-test</RequestID></Response>"
        ).encode()
        start_response(status, [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))])
        return [body]

    def throttle(self, start_response, service):
        """Each service's own throttling answer, as AWS sends it: EC2 (query protocol) 503 with
        RequestLimitExceeded in XML; KMS and SSM (JSON protocol) 400 ThrottlingException; Organizations 400
        TooManyRequestsException."""
        if service == "ec2":
            return self.refuse(start_response, "503 Service Unavailable", "RequestLimitExceeded", "Request limit exceeded.")
        code = "TooManyRequestsException" if service == "organizations" else "ThrottlingException"
        data = json.dumps({"__type": code, "message": "Rate exceeded"}).encode()
        start_response("400 Bad Request", [("Content-Type", "application/x-amz-json-1.1"),
                                           ("x-amzn-ErrorType", code), ("Content-Length", str(len(data)))])
        return [data]

    def broken_answer(self, start_response, kind):
        if kind == "html-500":
            data = b"<!doctype html>\n<html><head><title>500 Internal Server Error</title></head><body><h1>Internal Server Error</h1><p>The server encountered an internal error and was unable to complete your request.</p></body></html>"
            start_response("500 INTERNAL SERVER ERROR", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(data)))])
        else:
            data = b'<?xml version="1.0" encoding="UTF-8"?>\n<ModifyImageAttributeResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>ami-share-test</requestId><return>tr'
            start_response("200 OK", [("Content-Type", "text/xml"), ("Content-Length", str(len(data)))])
        return [data]

    def control_faults(self, fraction=0.0, seed=0, access_key=None):
        self.faults = (float(fraction), random.Random(seed), access_key)
        return {"fraction": self.faults[0], "seed": seed, "access_key": access_key}

    def control_broken_answer(self, action, kind=None):
        if kind is None:
            self.broken.pop(action, None)
        elif kind in ("html-500", "cut-xml"):
            self.broken[action] = kind
        else:
            raise ValueError(f"kind must be html-500, cut-xml or null, not {kind!r}")
        return {"action": action, "kind": kind}

    def control_region_refusal(self, region, kind=None):
        """AWS, for a region an account cannot use: an opt-in region not enabled for the account answers every
        EC2 call with 401 AuthFailure (its endpoint does not know the account's credentials); an overloaded
        one with 503 RequestLimitExceeded. `kind` None: serve it again."""
        kinds = {
            "opt-in": ("401 Unauthorized", "AuthFailure",
                       "AWS was not able to validate the provided access credentials"),
            "throttled": ("503 Service Unavailable", "RequestLimitExceeded", "Request limit exceeded."),
        }
        if kind is None:
            self.refusals.pop(region, None)
        else:
            self.refusals[region] = kinds[kind]
        return {"region": region, "kind": kind}

    def control_latency(self, seconds):
        self.latency = float(seconds)
        return {"latency": self.latency}

    def control_image_state(self, region, image_id, state):
        ec2_backends[ACCOUNT][region].amis[image_id].state = state
        return {"image_id": image_id, "state": state}

    def control_image_owner(self, region, image_id, owner_id):
        ec2_backends[ACCOUNT][region].amis[image_id].owner_id = owner_id
        return {"image_id": image_id, "owner_id": owner_id}

    def control_key_policy_race(self, region, key_id, writes):
        backend = kms_backends[ACCOUNT][region]
        _key_policy_races[(ACCOUNT, region, backend.get_key_id(key_id))] = writes
        return {"key_id": key_id, "writes": writes}

    def control_key_policy_writes(self):
        """Every PutKeyPolicy so far: the key and whether it asked to bypass the lockout safety check."""
        return list(_key_policy_writes)

    def control_key_policy_edit(self, region, key_id, statement):
        backend = kms_backends[ACCOUNT][region]
        _key_policy_edits[(ACCOUNT, region, backend.get_key_id(key_id))] = statement
        return {"key_id": key_id}

    def control_member(self, account, org_id, ou_ids=()):
        """Makes `account` a member of the organization, under the OUs `ou_ids` (root first)."""
        root = self.control_organization()["root_id"]
        path = "/".join([org_id, root, *ou_ids]) + "/"
        _org_members[account] = {"org": org_id, "ous": list(ou_ids), "path": path}
        return _org_members[account]

    def control_credentials(self, account):
        """Credentials of a principal in `account` (moto's STS maps an assumed role's keys to the role's
        account)."""
        creds = self.client("sts").assume_role(RoleArn=f"arn:aws:iam::{account}:role/receiver", RoleSessionName="check")
        c = creds["Credentials"]
        return {"access_key_id": c["AccessKeyId"], "secret_access_key": c["SecretAccessKey"],
                "session_token": c["SessionToken"]}

    def client(self, service):
        """A boto3 client of `service` on this emulator, as the default account."""
        import boto3

        return boto3.client(
            service,
            region_name="us-east-1",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def control_images(self, count, prefix, kms_key=None, encrypted_every=0, region="us-east-1"):
        """Seeds `count` AMIs named `prefix-00000`…, each made by CreateImage from an instance (every
        `encrypted_every`-th one's root volume encrypted with `kms_key`), in-process: thousands in seconds,
        where a test's own CreateImage calls would take minutes. The images are as CreateImage makes them."""
        ec2 = self.client("ec2")
        instances = {}
        for encrypted in {False, bool(encrypted_every and kms_key)}:
            mappings = []
            if encrypted:
                mappings = [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 8, "Encrypted": True, "KmsKeyId": kms_key}}]
            run = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, BlockDeviceMappings=mappings)
            instances[encrypted] = run["Instances"][0]["InstanceId"]
        backend = ec2_backends[ACCOUNT][region]
        images = []
        for n in range(count):
            encrypted = bool(encrypted_every and kms_key and n % encrypted_every == 0)
            ami = backend.create_image(instances[encrypted], f"{prefix}-{n:05d}", "seeded", [])
            images.append({"image_id": ami.id, "encrypted": encrypted})
        return {"images": images}

    def control_organization(self, ous=()):
        org = self.client("organizations")
        try:
            organization = org.describe_organization()["Organization"]
        except org.exceptions.AWSOrganizationsNotInUseException:
            organization = org.create_organization(FeatureSet="ALL")["Organization"]
        root = org.list_roots()["Roots"][0]
        units = {}
        for name in ous:
            unit = org.create_organizational_unit(ParentId=root["Id"], Name=name)["OrganizationalUnit"]
            units[name] = {"id": unit["Id"], "arn": unit["Arn"]}
        return {"id": organization["Id"], "arn": organization["Arn"], "root_id": root["Id"], "ous": units}


class QuietRequestHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass


def main():
    emulator = Emulator()
    server = make_server("127.0.0.1", 0, emulator, threaded=True, request_handler=QuietRequestHandler)
    host, port = server.server_address[:2]
    emulator.endpoint = f"http://{host}:{port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(json.dumps({"endpoint": emulator.endpoint}), flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # The parent holds our stdin: when it ends (or crashes), stdin closes and we stop with it.
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait()
    server.shutdown()


if __name__ == "__main__":
    main()
