"""Worker processes without processes: cancel key ownership, merging SHOW rows of several workers."""

from __future__ import annotations

from threadpool_proxy import admin, metrics
from threadpool_proxy.cancelkeys import CancelKeys, KeyLayout


def test_cancel_secrets_name_their_worker_and_stay_random():
    for count in (1, 2, 3, 7):
        for index in range(count):
            keys = CancelKeys(KeyLayout(0, index, count))
            secrets = {keys.new_secret() for _ in range(200)}
            assert len(secrets) > 190                      # still random (1 - log2(count) of 32 bits aside)
            assert all(len(s) == 4 and int.from_bytes(s, "big") % count == index for s in secrets)


def test_single_process_secrets_use_all_32_bits():
    keys = CancelKeys()
    assert {KeyLayout().owner(keys.new_secret()).worker for _ in range(50)} == {0}
    assert any(keys.new_secret()[3] % 2 for _ in range(50)) and any(not keys.new_secret()[3] % 2 for _ in range(50))


def test_merged_pools_add_counts_and_keep_the_longest_wait():
    a = [["db", "u", 3, 1, 0, 0, 2, 0, 0, 1, 0, 0, 0, 2, 500, "transaction"]]
    b = [["db", "u", 4, 2, 0, 0, 2, 0, 0, 0, 0, 0, 1, 1, 900000, "transaction"],
         ["db2", "u", 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, "session"]]
    rows = admin.MERGES["pools"](admin.POOL_COLUMNS, [a, b])
    assert rows == [["db", "u", 7, 3, 0, 0, 4, 0, 0, 1, 0, 0, 1, 2, 500, "transaction"],
                    ["db2", "u", 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, "session"]]


def test_merged_stats_sum_totals_and_weigh_average_times():
    columns = ([("database", "s")] + [("total_" + n, "i") for n in admin.STATS_TOTAL_NAMES]
               + [("avg_" + n, "i") for n in admin.STATS_AVERAGE_NAMES])
    names = [n for n, _ in columns]

    def row(xacts, xact_time, avg_xacts, avg_xact_time):
        r = ["db"] + [0] * (len(columns) - 1)
        r[names.index("total_xact_count")], r[names.index("total_xact_time")] = xacts, xact_time
        r[names.index("avg_xact_count")], r[names.index("avg_xact_time")] = avg_xacts, avg_xact_time
        return r

    [merged] = admin.MERGES["stats"](columns, [[row(10, 1000, 300, 100)], [row(30, 5000, 100, 500)]])
    assert merged[names.index("total_xact_count")] == 40
    assert merged[names.index("total_xact_time")] == 6000
    assert merged[names.index("avg_xact_count")] == 400
    assert merged[names.index("avg_xact_time")] == 200          # (300*100 + 100*500) / 400


def test_merged_lists_and_databases():
    lists = admin.MERGES["lists"](None, [[["databases", 2], ["used_clients", 3]], [["databases", 2],
                                                                                    ["used_clients", 4]]])
    assert lists == [["databases", 2], ["used_clients", 7]]
    cols = admin.DATABASE_COLUMNS
    a = ["app", "h", 5432, "app", None, 4, 0, 0, 0, "transaction", None, 0, 2, 0, 5, 0, 0]
    b = ["app", "h", 5432, "app", None, 4, 0, 0, 0, "transaction", None, 0, 1, 0, 6, 1, 0]
    assert admin.MERGES["databases"](cols, [[a], [b]]) == [
        ["app", "h", 5432, "app", None, 4, 0, 0, 0, "transaction", None, 0, 3, 0, 11, 1, 0]]


def test_merged_metrics_figures():
    one = {"pools": [["db", "u", 1, 2, 3, 4, 0, 1.5]], "totals": {"db": {"xact_count": 5}},
           "events": {"reuses": 2}, "clients": 3, "servers": 7, "workers": 1}
    two = {"pools": [["db", "u", 1, 0, 1, 0, 1, 0.5]], "totals": {"db": {"xact_count": 6}},
           "events": {"reuses": 1, "parked": 4}, "clients": 1, "servers": 2, "workers": 1}
    fig = metrics.merge_figures([one, two])
    assert fig["pools"] == {("db", "u"): [2, 2, 4, 4, 1, 1.5]}
    assert fig["totals"] == {"db": {"xact_count": 11}}
    assert fig["events"] == {"reuses": 3, "parked": 4}
    assert (fig["clients"], fig["servers"], fig["workers"]) == (4, 9, 2)
