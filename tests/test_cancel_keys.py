"""The cancel key layout (cancelkeys.py): which proxy (peer_id) and worker a secret names,
where a CancelRequest goes from each proxy, and that the rest of the secret is random.

No sockets: the layout and the routing decision are plain functions.
"""

from __future__ import annotations

import random
import statistics

from hypothesis import given, settings, strategies as st

from threadpool_proxy.cancelkeys import (PEER_ID_MAX, CancelKeys, KeyLayout, RouteKind, forwarded, route)

peer_ids = st.integers(min_value=1, max_value=255)

#: No per-example deadline: on a loaded machine one example (microseconds of work) can wait 300 ms
#: for a CPU, and hypothesis's default 200 ms deadline then fails the test for the machine's sake.
NO_DEADLINE = settings(deadline=None)


@st.composite
def layouts(draw, peering=True):
    workers = draw(st.integers(min_value=1, max_value=64))
    return KeyLayout(draw(peer_ids) if peering else 0, draw(st.integers(0, workers - 1)), workers)


def test_the_peer_id_range_is_what_the_documentation_says():
    assert PEER_ID_MAX == 255
    assert KeyLayout(255, 0, 1).owner(KeyLayout(255, 0, 1).new_secret()).peer_id == 255


@NO_DEADLINE
@given(layouts())
def test_a_secret_names_the_peer_and_worker_that_made_it(layout):
    for _ in range(20):
        secret = layout.new_secret()
        assert len(secret) == 4
        owner = layout.owner(secret)
        assert (owner.peer_id, owner.worker, owner.fresh) == (layout.peer_id, layout.worker, True)


@NO_DEADLINE
@given(layouts(peering=False))
def test_without_peering_the_worker_is_the_secret_modulo_the_worker_count(layout):
    for _ in range(20):
        secret = layout.new_secret()
        assert int.from_bytes(secret, "big") % layout.workers == layout.worker
        assert layout.owner(secret).peer_id == 0


@NO_DEADLINE
@given(layouts(), peer_ids, st.integers(min_value=0, max_value=63))
def test_keys_of_different_peers_or_workers_never_collide(layout, other_peer, other_worker):
    """Any proxy decodes the peer id, and the issuing proxy the worker: two issuers differ in
    what their secrets decode to, so no secret of one can be a secret of the other."""
    other = KeyLayout(other_peer, other_worker % layout.workers, layout.workers)
    mine = {layout.new_secret() for _ in range(50)}
    theirs = {other.new_secret() for _ in range(50)}
    if (other.peer_id, other.worker) != (layout.peer_id, layout.worker):
        assert not mine & theirs
        # and every proxy (whatever its own id) reads the right peer from each
        reader = KeyLayout(1 + layout.peer_id % PEER_ID_MAX, 0, 1)
        assert {reader.owner(s).peer_id for s in mine} == {layout.peer_id}
        assert {reader.owner(s).peer_id for s in theirs} == {other.peer_id}


def test_all_255_peers_times_4_workers_give_disjoint_keys():
    seen: dict[bytes, tuple[int, int]] = {}
    for peer in range(1, 256):
        for worker in range(4):
            layout = KeyLayout(peer, worker, 4)
            for _ in range(8):
                secret = layout.new_secret()
                assert seen.setdefault(secret, (peer, worker)) == (peer, worker)
    assert len({who for who in seen.values()}) == 255 * 4


@NO_DEADLINE
@given(layouts())
def test_a_forwarded_secret_keeps_its_owner_and_is_no_longer_fresh(layout):
    secret = layout.new_secret()
    copy = forwarded(secret)
    assert copy != secret
    owner = layout.owner(copy)
    assert (owner.peer_id, owner.worker, owner.fresh) == (layout.peer_id, layout.worker, False)
    assert forwarded(copy) == copy                  # forwarding never makes it fresh again
    assert layout.canonical(copy) == secret


def _bits(values: list[int], width: int) -> list[float]:
    return [sum((v >> b) & 1 for v in values) / len(values) for b in range(width)]


def test_the_random_part_is_uniform_bit_by_bit():
    """20,000 secrets of peer 7, worker 1 of 4: every random bit is set half the time
    (within 6 standard deviations, 0.021), the routing bits are constant."""
    layout, n = KeyLayout(7, 1, 4), 20_000
    values = [int.from_bytes(layout.new_secret(), "big") for _ in range(n)]
    assert {v & 0x1FF for v in values} == {7 << 1 | 1}                   # fresh bit and peer id
    assert {(v >> 9) % 4 for v in values} == {1}                        # the worker
    randoms = [(v >> 9) // 4 for v in values]                           # 21 random bits
    assert max(randoms) < 2**21
    limit = 6 * (0.25 / n) ** 0.5
    for share in _bits(randoms, 21):
        assert abs(share - 0.5) < limit, _bits(randoms, 21)
    # and the values spread over the whole range: mean and spread of a uniform [0, 2^21)
    assert abs(statistics.fmean(randoms) / 2**21 - 0.5) < 0.01
    assert abs(statistics.pstdev(randoms) / 2**21 - (1 / 12) ** 0.5) < 0.01


def test_the_random_bits_left_for_each_layout():
    """The numbers docs/several-proxies.md gives (32, 30, 23 and 21 random bits): the random
    part of 4,000 secrets of each layout stays below 2^bits and reaches its top 1%."""
    for layout, bits in ((KeyLayout(), 32), (KeyLayout(0, 3, 4), 30), (KeyLayout(3, 0, 1), 23),
                         (KeyLayout(3, 2, 4), 21)):
        values = [int.from_bytes(layout.new_secret(), "big") for _ in range(4000)]
        randoms = [(v >> 9 if layout.peer_id else v) // layout.workers for v in values]
        assert max(randoms) < 2**bits
        assert max(randoms) > 0.99 * 2**bits


def test_secrets_do_not_come_from_the_random_module():
    """Seeding Python's ``random`` does not repeat them: they come from ``secrets`` (the OS)."""
    layout = KeyLayout(5, 0, 2)
    random.seed(1234)
    first = [layout.new_secret() for _ in range(20)]
    random.seed(1234)
    second = [layout.new_secret() for _ in range(20)]
    assert first != second
    assert len(set(first) | set(second)) == 40


# -- where a cancel goes ---------------------------------------------------------------

def test_routes_of_one_proxy():
    me = KeyLayout(2, 0, 2)
    peers = {1, 2, 3}
    assert route(me, peers, me.new_secret()).kind is RouteKind.HERE
    sibling = KeyLayout(2, 1, 2).new_secret()
    assert (route(me, peers, sibling).kind, route(me, peers, sibling).worker) == (RouteKind.WORKER, 1)
    other = KeyLayout(3, 1, 4).new_secret()
    assert (route(me, peers, other).kind, route(me, peers, other).peer_id) == (RouteKind.PEER, 3)
    # a forwarded key of this proxy is handled here (or by its worker), never sent on
    assert route(me, peers, forwarded(me.new_secret())).kind is RouteKind.HERE
    assert route(me, peers, forwarded(sibling)).kind is RouteKind.WORKER
    # a forwarded key of another peer is dropped: the two proxies' lists disagree
    dropped = route(me, peers, forwarded(other))
    assert dropped.kind is RouteKind.DROP and "names peer 3" in dropped.why
    # a key of a peer not in the list cancels nothing
    stranger = route(me, peers, KeyLayout(9, 0, 1).new_secret())
    assert stranger.kind is RouteKind.DROP and "peer 9, which is not in peers" in stranger.why


def test_without_peering_nothing_goes_to_a_peer():
    me = KeyLayout(0, 1, 3)
    for _ in range(200):
        secret = random.getrandbits(32).to_bytes(4, "big")
        assert route(me, {}, secret).kind in (RouteKind.HERE, RouteKind.WORKER)


@settings(max_examples=300, deadline=None)
@given(st.lists(peer_ids, min_size=1, max_size=6, unique=True), st.data())
def test_a_cancel_crosses_at_most_one_host_whatever_the_address_lists_say(ids, data):
    """Each proxy has its own peers list, mapping ids to whichever proxy (even a wrong one):
    following the routes from any proxy, a cancel is handled, dropped, or sent on once."""
    wrong = {i: data.draw(st.sampled_from(ids)) for i in ids}       # where "peer i" really leads
    secret = KeyLayout(data.draw(st.sampled_from(ids + [254 if 254 not in ids else 253])), 0, 1).new_secret()
    at, hops = data.draw(st.sampled_from(ids)), 0
    while True:
        way = route(KeyLayout(at, 0, 1), set(ids), secret)
        if way.kind is not RouteKind.PEER:
            break
        secret, at, hops = forwarded(secret), wrong[way.peer_id], hops + 1
        assert hops <= 1


# -- the registry ------------------------------------------------------------------------

def test_lookup_takes_the_forwarded_copy_and_nothing_else():
    keys = CancelKeys(KeyLayout(4, 0, 1))
    session = object()
    pid, secret = keys.register(session)
    assert keys.lookup(pid, secret) is session
    assert keys.lookup(pid, forwarded(secret)) is session
    value = int.from_bytes(secret, "big")
    for bit in range(1, 32):                      # any other bit wrong: nobody
        assert keys.lookup(pid, (value ^ 1 << bit).to_bytes(4, "big")) is None
    assert keys.lookup(pid + 1, secret) is None
    keys.unregister(pid)
    assert keys.lookup(pid, secret) is None


def test_without_peering_every_bit_of_the_secret_counts():
    keys = CancelKeys(KeyLayout())
    pid, secret = keys.register(object())
    value = int.from_bytes(secret, "big")
    assert all(keys.lookup(pid, (value ^ 1 << bit).to_bytes(4, "big")) is None for bit in range(32))
