"""Tickets: signing, verification, the issuer's record, and every reason to refuse a request."""

from __future__ import annotations

import json
import stat
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedps.engine import tickets
from fedps.engine.agreement import schema_hash
from fedps.engine.tickets import Request, Ticket, TicketRefused, TicketStore, check_request
from fedps.errors import ConfigError
from fedps.messaging.identity import public_text

SCHEMA = schema_hash(["id", "x0", "x1"])


@pytest.fixture
def keys():
    return {name: Ed25519PrivateKey.generate() for name in ("bank", "shop", "mallory")}


def public(keys, name):
    return public_text(keys[name].public_key())


def make_ticket(keys, **overrides) -> Ticket:
    settings = dict(algorithms=["psi", "channel_demo"], datasets={"breast": SCHEMA},
                    expires_at=time.time() + 3600, max_runs=2)
    settings.update(overrides)
    return tickets.issue(keys["bank"], "bank", "shop", public(keys, "shop"), **settings)


@pytest.fixture
def store(tmp_path):
    return TicketStore(tmp_path / "tickets")


def check(keys, store, ticket, requester="shop", requester_key=None, algorithm="psi", dataset="breast",
          job="job-1", schemas=None, now=None):
    request = Request(ticket, job, algorithm, dataset)
    check_request(request, own_key=public(keys, "bank"), own_name="bank", requester=requester,
                  requester_key=requester_key or public(keys, requester), store=store,
                  schemas={"breast": SCHEMA} if schemas is None else schemas, now=now)


def refusal(*args, **kwargs) -> TicketRefused:
    with pytest.raises(TicketRefused) as caught:
        check(*args, **kwargs)
    return caught.value


def test_issued_ticket_round_trips_through_its_file_and_verifies(keys):
    ticket = make_ticket(keys)
    again = Ticket.from_json(ticket.to_json())
    assert again.body == ticket.body and again.signature == ticket.signature
    tickets.verify_signature(again, public(keys, "bank"))
    assert again.peer == "shop" and again.datasets == {"breast": SCHEMA} and again.max_runs == 2
    assert again.algorithms == ["channel_demo", "psi"]


def test_canonical_body_ignores_key_order(keys):
    body = dict(make_ticket(keys).body)
    reordered = dict(reversed(list(body.items())))
    assert tickets.canonical(body) == tickets.canonical(reordered)


def test_altered_ticket_is_refused_as_forged(keys):
    ticket = make_ticket(keys)
    data = json.loads(ticket.to_json())
    data["ticket"]["max_runs"] = 1000
    with pytest.raises(TicketRefused) as caught:
        tickets.verify_signature(Ticket.from_json(json.dumps(data)), public(keys, "bank"))
    assert caught.value.reason == "forged"


def test_ticket_re_signed_by_another_key_is_refused_naming_that_key(keys):
    body = dict(make_ticket(keys).body, issuer={"name": "bank", "key": public(keys, "mallory")}, max_runs=99)
    forged = Ticket(body, keys["mallory"].sign(tickets.canonical(body)))
    with pytest.raises(TicketRefused) as caught:
        tickets.verify_signature(forged, public(keys, "bank"))
    assert caught.value.reason == "re-signed" and public(keys, "mallory") in str(caught.value)


def test_ticket_signed_by_another_key_but_naming_ours_is_forged(keys):
    body = dict(make_ticket(keys).body, max_runs=99)
    forged = Ticket(body, keys["mallory"].sign(tickets.canonical(body)))
    with pytest.raises(TicketRefused) as caught:
        tickets.verify_signature(forged, public(keys, "bank"))
    assert caught.value.reason == "forged"


@pytest.mark.parametrize("text", ["not json", "{}", '{"ticket": {"version": 1}, "signature": "AA=="}'])
def test_malformed_ticket_is_refused_by_name(text):
    with pytest.raises(TicketRefused) as caught:
        Ticket.from_json(text)
    assert caught.value.reason == "malformed"


def test_request_within_its_ticket_passes(keys, store):
    ticket = make_ticket(keys)
    store.add(ticket)
    check(keys, store, ticket)


def test_ticket_not_issued_from_this_state_folder_is_refused(keys, store):
    assert refusal(keys, store, make_ticket(keys)).reason == "unknown"


def test_revoked_ticket_is_refused(keys, store):
    ticket = make_ticket(keys)
    store.add(ticket)
    store.revoke(ticket.id, "contract ended")
    assert refusal(keys, store, ticket).reason == "revoked"


def test_requester_who_is_not_the_ticket_peer_is_refused(keys, store):
    ticket = make_ticket(keys)
    store.add(ticket)
    assert refusal(keys, store, ticket, requester="mallory").reason == "not-the-peer"
    # the peer's name, but another key than the one the ticket names
    assert refusal(keys, store, ticket, requester_key=public(keys, "mallory")).reason == "not-the-peer"


def test_expired_ticket_is_refused(keys, store):
    ticket = make_ticket(keys)
    store.add(ticket)
    found = refusal(keys, store, ticket, now=time.time() + 7200)
    assert found.reason == "expired" and ticket.body["expires_at"] in str(found)


def test_ticket_over_its_run_count_is_refused(keys, store):
    ticket = make_ticket(keys)
    store.add(ticket)
    store.record(ticket.id, "job-a", "done")
    store.record(ticket.id, "job-b", "refused", "expired")   # a refused request is not a run
    check(keys, store, ticket, job="job-c")
    store.record(ticket.id, "job-c", "failed")
    found = refusal(keys, store, ticket, job="job-d")
    assert found.reason == "over-run-count" and "allows 2 runs and has had 2" in str(found)


def test_other_algorithm_is_refused(keys, store):
    ticket = make_ticket(keys)
    store.add(ticket)
    assert refusal(keys, store, ticket, algorithm="hetero_lr").reason == "other-algorithm"


def test_other_dataset_is_refused(keys, store):
    ticket = make_ticket(keys)
    store.add(ticket)
    assert refusal(keys, store, ticket, dataset="salaries").reason == "other-dataset"


def test_dataset_whose_columns_changed_since_the_ticket_is_refused(keys, store):
    ticket = make_ticket(keys)
    store.add(ticket)
    changed = {"breast": schema_hash(["id", "x0", "x1", "income"])}
    assert refusal(keys, store, ticket, schemas=changed).reason == "schema-changed"


def test_job_id_already_run_is_refused(keys, store):
    ticket = make_ticket(keys)
    store.add(ticket)
    store.record(ticket.id, "job-1", "done")
    assert refusal(keys, store, ticket, job="job-1").reason == "job-id-used"


def test_request_found_after_its_requester_stopped_waiting_is_refused_as_stale(keys, store):
    ticket = make_ticket(keys)
    store.add(ticket)
    request = Request(ticket, "job-1", "psi", "breast", requested_at=time.time() - 700)
    with pytest.raises(TicketRefused) as caught:
        check_request(request, own_key=public(keys, "bank"), own_name="bank", requester="shop",
                      requester_key=public(keys, "shop"), store=store, schemas={"breast": SCHEMA}, max_age_s=600)
    assert caught.value.reason == "stale"
    fresh = Request.from_value(Request(ticket, "job-1", "psi", "breast").to_value())
    check_request(fresh, own_key=public(keys, "bank"), own_name="bank", requester="shop",
                  requester_key=public(keys, "shop"), store=store, schemas={"breast": SCHEMA}, max_age_s=600)


def test_malformed_request_is_refused(keys):
    with pytest.raises(TicketRefused) as caught:
        Request.from_value({"ticket": json.loads(make_ticket(keys).to_json()), "job": "../etc",
                            "algorithm": "psi", "dataset": "breast"})
    assert caught.value.reason == "bad-request"


def test_store_files_are_private_and_listing_shows_state_and_uses(keys, store):
    ticket = make_ticket(keys, max_runs=1)
    path = store.add(ticket)
    store.record(ticket.id, "job-a", "accepted")
    store.record(ticket.id, "job-a", "done")
    store.record(ticket.id, "job-b", "refused", "over-run-count: ...")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.folder.stat().st_mode) == 0o700
    assert [u["outcome"] for u in store.uses(ticket.id)] == ["done", "refused"]
    text = tickets.listing(store)
    assert f"{ticket.id}  used up  peer shop" in text and "runs 1/1" in text
    assert "job job-a  done" in text and "job job-b  refused  (over-run-count" in text
    store.revoke(ticket.id)
    assert f"{ticket.id}  revoked" in tickets.listing(store)


def test_issue_refuses_a_past_expiry_or_no_runs(keys):
    with pytest.raises(ConfigError, match="future"):
        make_ticket(keys, expires_at=time.time() - 1)
    with pytest.raises(ConfigError, match="at least 1"):
        make_ticket(keys, max_runs=0)


def test_expiry_parses_durations_and_iso_times():
    assert tickets.parse_expiry("2h", now=1000.0) == 1000.0 + 7200
    assert tickets.parse_expiry("2026-12-02T00:00:00Z") == tickets.parse_expiry("2026-12-02T00:00:00")
    with pytest.raises(ConfigError, match="expiry"):
        tickets.parse_expiry("soon")
