"""A check the contract test adds to schemathesis's own (loaded through SCHEMATHESIS_HOOKS):
the documented exception, a schema-valid body answered 400, is allowed for the two reasons a
schema cannot express, and no other. Either every `image` in the body is a data URL whose
payload is real, non-empty base64 (bytes a schema cannot tell from a picture) and the answer
says it could not be decoded; or a feedback post holds a blank drawing ("nothing drawn":
there is no digit to label). Any other schema-valid body refused is a gap between the schema
and the server."""

import base64
import binascii

import schemathesis


def _images(body) -> list[str]:
    if not isinstance(body, dict):
        return []
    items = body.get("batch") if isinstance(body.get("batch"), list) else [body]
    return [item["image"] for item in items
            if isinstance(item, dict) and isinstance(item.get("image"), str)]


def _real_bytes(data_url: str) -> bool:
    try:
        return bool(base64.b64decode(data_url.split(",", 1)[1], validate=True))
    except (binascii.Error, IndexError):
        return False


@schemathesis.check
def refused_only_for_undecodable_images(ctx, response, case):
    if (case.meta is None or not case.meta.generation.mode.is_positive
            or response.status_code != 400):
        return None
    if case.operation.path == "/v1/feedback" and "nothing drawn" in response.text:
        return None
    images = _images(case.body)
    if not images or not all(_real_bytes(image) for image in images) or \
            "could not be decoded" not in response.text:
        raise AssertionError("a schema-valid body was refused with 400, and not for an image "
                             f"whose bytes do not decode: {response.text[:200]}")
    return None
