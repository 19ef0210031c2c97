"""Partition keys, ranges and definitions (SPEC 3)."""

import itertools
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

import flowstone as fs

UTC = timezone.utc

# ------------------------------------------------------------------ serialize


def test_date_serializes_to_iso_day():
    assert fs.serialize_partition(date(2025, 1, 15)) == "2025-01-15"


def test_aware_datetime_serializes_in_utc_with_z():
    paris = datetime(2025, 1, 15, 15, 30, tzinfo=ZoneInfo("Europe/Paris"))
    assert fs.serialize_partition(paris) == "2025-01-15T14:30:00Z"


def test_datetime_microseconds_are_kept():
    value = datetime(2025, 1, 15, 14, 30, 0, 123456, tzinfo=UTC)
    assert fs.serialize_partition(value) == "2025-01-15T14:30:00.123456Z"


def test_naive_datetime_is_refused():
    with pytest.raises(fs.InvalidPartition, match="naive"):
        fs.serialize_partition(datetime(2025, 1, 15, 14, 30))


def test_string_serializes_to_itself_and_none_to_none():
    assert fs.serialize_partition("eu-west") == "eu-west"
    assert fs.serialize_partition(None) is None


def test_tuple_joins_parts_with_pipe():
    key = fs.serialize_partition(("tenant_1", "region_a", date(2025, 1, 15)))
    assert key == "tenant_1|region_a|2025-01-15"


def test_pipe_and_backslash_inside_parts_are_escaped():
    assert fs.serialize_partition(("a|b", "c\\d")) == "a\\|b|c\\\\d"


@pytest.mark.parametrize("bad", [1, 1.5, True, b"x", ["a"], {"a": 1}, object()])
def test_unsupported_types_are_refused_with_the_type_named(bad):
    with pytest.raises(fs.InvalidPartition, match=type(bad).__name__):
        fs.serialize_partition(bad)


@pytest.mark.parametrize("bad", [(), ("a", None)])
def test_empty_tuple_or_none_part_is_refused(bad):
    with pytest.raises(fs.InvalidPartition):
        fs.serialize_partition(bad)


# ---------------------------------------------------------------- deserialize


def test_deserialize_each_kind():
    assert fs.deserialize_partition("2025-01-15", "date") == date(2025, 1, 15)
    assert fs.deserialize_partition("2025-01-15T14:30:00Z", "datetime") == datetime(
        2025, 1, 15, 14, 30, tzinfo=UTC
    )
    assert fs.deserialize_partition("x|y", "string") == "x|y"
    assert fs.deserialize_partition(
        "tenant_1|region_a|2025-01-15", ("string", "string", "date")
    ) == ("tenant_1", "region_a", date(2025, 1, 15))


def test_deserialized_datetime_is_aware_utc():
    value = fs.deserialize_partition("2025-01-15T15:30:00+01:00", "datetime")
    assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
    assert value == datetime(2025, 1, 15, 14, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("2025-13-01", "date"),
        ("2025-02-30", "date"),
        ("20250115", "date"),
        ("2025-W03-1", "date"),
        ("2025-01-15T14:30:00", "datetime"),  # naive
        ("2025-01-15", "datetime"),
        ("yesterday", "date"),
        ("a|b", ("string", "string", "string")),
        ("a|b|c", ("string", "string")),
        ("a\\x|b", ("string", "string")),  # bad escape
        ("a\\", ("string",)),  # dangling escape
    ],
)
def test_malformed_keys_name_the_input_and_kind(key, kind):
    with pytest.raises(fs.InvalidPartition) as info:
        fs.deserialize_partition(key, kind)
    assert repr(key) in str(info.value) or str(kind) in str(info.value)


def test_unknown_kind_is_invalid_partition():
    with pytest.raises(fs.InvalidPartition, match="unknown partition kind"):
        fs.deserialize_partition("x", "weekday")


def test_non_string_key_is_invalid_partition():
    with pytest.raises(fs.InvalidPartition, match="must be a str"):
        fs.deserialize_partition(20250115, "date")


parts = st.text()


@given(st.lists(parts, min_size=1, max_size=6).map(tuple))
def test_every_tuple_of_strings_round_trips(value):
    key = fs.serialize_partition(value)
    assert fs.deserialize_partition(key, ("string",) * len(value)) == value


@given(st.lists(parts, min_size=1, max_size=4), st.lists(parts, min_size=1, max_size=4))
def test_distinct_tuples_get_distinct_keys(a, b):
    if tuple(a) != tuple(b):
        assert fs.serialize_partition(tuple(a)) != fs.serialize_partition(tuple(b))


aware = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.timezones()
)


@given(st.dates(), aware, parts)
def test_mixed_composite_round_trips(day, moment, text):
    """The instant survives; it comes back in UTC. (Compared in UTC because PEP 495
    makes a wall time inside a DST gap unequal to every time in another zone.)"""
    value = (text, day, moment)
    back = fs.deserialize_partition(fs.serialize_partition(value), ("string", "date", "datetime"))
    assert back == (text, day, moment.astimezone(UTC))
    assert back[2].utcoffset() == timedelta(0)


@given(st.text(), st.sampled_from(["date", "datetime", "string", ("string", "date")]))
def test_deserialize_raises_only_invalid_partition(text, kind):
    try:
        fs.deserialize_partition(text, kind)
    except fs.InvalidPartition:
        pass


# ---------------------------------------------------------------------- range


def test_day_range_is_inclusive():
    days = fs.partition_range(date(2025, 1, 1), date(2025, 1, 5), "day")
    assert days == [date(2025, 1, d) for d in range(1, 6)]


def test_hour_range_over_datetimes():
    start = datetime(2025, 1, 1, 22, tzinfo=UTC)
    hours = fs.partition_range(start, start + timedelta(hours=3), "hour")
    assert len(hours) == 4 and hours[-1] == datetime(2025, 1, 2, 1, tzinfo=UTC)


def test_hour_range_crosses_daylight_saving_without_gaps():
    tz = ZoneInfo("Europe/Paris")
    start = datetime(2025, 3, 30, 0, tzinfo=tz)  # clocks jump 02:00 -> 03:00 local
    stop = datetime(2025, 3, 30, 4, tzinfo=tz)
    hours = fs.partition_range(start, stop, "hour")
    assert len(hours) == 4  # 23:00Z .. 02:00Z: four real hours
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(hours))


def test_week_and_timedelta_steps():
    assert len(fs.partition_range(date(2025, 1, 1), date(2025, 1, 29), "week")) == 5
    assert fs.partition_range(date(2025, 1, 1), date(2025, 1, 6), timedelta(days=2)) == [
        date(2025, 1, 1), date(2025, 1, 3), date(2025, 1, 5)
    ]


def test_month_steps_clamp_to_month_end_without_drift():
    months = fs.partition_range(date(2025, 1, 31), date(2025, 5, 31), "month")
    assert months == [
        date(2025, 1, 31), date(2025, 2, 28), date(2025, 3, 31), date(2025, 4, 30), date(2025, 5, 31)
    ]


@pytest.mark.parametrize(
    ("start", "stop", "step"),
    [
        (date(2025, 1, 1), datetime(2025, 1, 2, tzinfo=UTC), "day"),  # mixed types
        ("2025-01-01", "2025-01-02", "day"),
        (date(2025, 1, 1), date(2025, 1, 2), "hour"),  # hour on dates
        (date(2025, 1, 1), date(2025, 1, 2), timedelta(hours=12)),
        (date(2025, 1, 1), date(2025, 1, 2), "fortnight"),
        (date(2025, 1, 1), date(2025, 1, 2), timedelta(0)),
        (datetime(2025, 1, 1), datetime(2025, 1, 2), "hour"),  # naive
        (date(2025, 1, 5), date(2025, 1, 1), "day"),  # reversed
    ],
)
def test_bad_ranges_are_invalid_partition(start, stop, step):
    with pytest.raises(fs.InvalidPartition):
        fs.partition_range(start, stop, step)


@given(st.dates(max_value=date(9000, 1, 1)), st.integers(0, 400))
def test_day_range_has_one_item_per_day(start, days):
    result = fs.partition_range(start, start + timedelta(days=days), "day")
    assert len(result) == days + 1 and result[0] == start


# ---------------------------------------------------------------- definitions


def test_daily_partitions_keys_are_dates_within_bounds():
    daily = fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 12, 31))
    keys = daily.keys()
    assert len(keys) == 365 and keys[0] == date(2025, 1, 1) and daily.kind == "date"
    assert daily.keys(start=date(2025, 3, 1), end=date(2025, 3, 3)) == [
        date(2025, 3, 1), date(2025, 3, 2), date(2025, 3, 3)
    ]


def test_daily_keys_clamp_bounds_outside_the_definition():
    daily = fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 1, 3))
    assert daily.keys(start=date(2024, 1, 1), end=date(2026, 1, 1)) == daily.keys()


def test_open_ended_daily_stops_at_the_last_complete_day():
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    keys = fs.DailyPartitions(start=yesterday - timedelta(days=2)).keys()
    assert keys[-1] == yesterday and len(keys) == 3


def test_daily_validate_accepts_key_strings_and_checks_bounds():
    daily = fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 1, 31))
    assert daily.validate("2025-01-15") == date(2025, 1, 15)
    with pytest.raises(fs.InvalidPartition, match="outside"):
        daily.validate(date(2024, 12, 31))
    with pytest.raises(fs.InvalidPartition, match="must be a date"):
        daily.validate(datetime(2025, 1, 15, tzinfo=UTC))
    with pytest.raises(fs.InvalidPartition):
        daily.validate("2025-1-15")


def test_hourly_partitions_are_utc_hours():
    start = datetime(2025, 1, 1, tzinfo=UTC)
    hourly = fs.HourlyPartitions(start=start, end=start + timedelta(hours=23))
    assert len(hourly.keys()) == 24 and hourly.kind == "datetime"
    assert hourly.validate("2025-01-01T05:00:00Z") == start + timedelta(hours=5)
    with pytest.raises(fs.InvalidPartition, match="on the hour"):
        hourly.validate(start + timedelta(minutes=30))
    with pytest.raises(fs.InvalidPartition, match="naive"):
        hourly.validate(datetime(2025, 1, 1, 5))


def test_hourly_start_may_be_a_date_meaning_midnight_utc():
    assert fs.HourlyPartitions(start=date(2025, 1, 1)).start == datetime(2025, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "build",
    [
        lambda: fs.DailyPartitions(start=date(2025, 2, 1), end=date(2025, 1, 1)),
        lambda: fs.DailyPartitions(start="not a date"),
        lambda: fs.HourlyPartitions(start=datetime(2025, 1, 1)),
        lambda: fs.HourlyPartitions(start=datetime(2025, 1, 1, 0, 30, tzinfo=UTC)),
        lambda: fs.StaticPartitions([]),
        lambda: fs.StaticPartitions("abc"),
        lambda: fs.StaticPartitions(["a", "a"]),
        lambda: fs.StaticPartitions(["a", ""]),
        lambda: fs.CompositePartitions(fs.StaticPartitions(["a"])),
        lambda: fs.CompositePartitions(fs.StaticPartitions(["a"]), "daily"),
    ],
)
def test_bad_partition_definitions_are_invalid_partition(build):
    with pytest.raises(fs.InvalidPartition):
        build()


def test_static_partitions_keep_order_and_slice_by_position():
    regions = fs.StaticPartitions(keys=["eu", "us", "apac"])
    assert regions.keys() == ["eu", "us", "apac"] and regions.kind == "string"
    assert regions.keys(start="us") == ["us", "apac"]
    assert regions.validate("eu") == "eu"
    with pytest.raises(fs.InvalidPartition, match="not one of"):
        regions.validate("mars")


def test_composite_partitions_are_the_product_of_dimensions():
    combo = fs.CompositePartitions(
        fs.StaticPartitions(["eu", "us"]),
        fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 1, 3)),
    )
    assert combo.kind == ("string", "date")
    assert len(combo.keys()) == 6
    assert combo.keys()[0] == ("eu", date(2025, 1, 1))
    assert combo.validate("us|2025-01-02") == ("us", date(2025, 1, 2))
    assert combo.key(("us", date(2025, 1, 2))) == "us|2025-01-02"
    with pytest.raises(fs.InvalidPartition):
        combo.validate(("us",))
    with pytest.raises(fs.InvalidPartition):
        combo.validate(("mars", date(2025, 1, 2)))


def test_partition_definitions_are_immutable_values():
    a = fs.DailyPartitions(start=date(2025, 1, 1))
    assert a == fs.DailyPartitions(start=date(2025, 1, 1))
    assert hash(a) == hash(fs.DailyPartitions(start=date(2025, 1, 1)))


def test_static_keys_are_checked_by_lookup_and_keep_their_order_and_equality():
    many = fs.StaticPartitions([f"customer-{i:05d}" for i in range(80_000)])
    assert many.validate("customer-79999") == "customer-79999"
    assert many.keys("customer-00003", "customer-00005") == ["customer-00003", "customer-00004", "customer-00005"]
    for bad in ("customer-80000", ["customer-00001"], 1):
        with pytest.raises(fs.InvalidPartition):
            many.validate(bad)
    assert fs.StaticPartitions(["a", "b"]) == fs.StaticPartitions(("a", "b")) != fs.StaticPartitions(["b", "a"])
    assert "positions" not in repr(fs.StaticPartitions(["a"]))


# ------------------------------------------------------------------ time zones

LA = "America/Los_Angeles"


def test_a_local_day_starts_at_local_midnight_on_dst_days_too():
    daily = fs.DailyPartitions(start=date(2025, 1, 1), timezone=LA)
    lengths = {}
    for day in (date(2025, 3, 9), date(2025, 3, 10), date(2025, 11, 2)):
        start, end = daily.window(day)
        local = start.astimezone(daily.zone)
        assert (local.hour, local.minute, local.date()) == (0, 0, day)  # local midnight, in Los Angeles
        lengths[day] = end - start
    assert lengths == {
        date(2025, 3, 9): timedelta(hours=23), date(2025, 3, 10): timedelta(hours=24),
        date(2025, 11, 2): timedelta(hours=25),
    }
    assert daily.window(date(2025, 3, 9))[0] == datetime(2025, 3, 9, 8, tzinfo=UTC)
    assert fs.serialize_partition(date(2025, 3, 9)) == "2025-03-09"  # keys stay ISO dates


def test_a_fall_back_night_has_two_local_one_oclock_hours_and_spring_forward_none():
    hourly = fs.HourlyPartitions(start=date(2025, 1, 1), timezone=LA)
    daily = fs.DailyPartitions(start=date(2025, 1, 1), timezone=LA)
    zone = ZoneInfo(LA)

    def hours_of(day):
        start, end = daily.window(day)
        return hourly.keys(start, end - timedelta(hours=1))

    fall = hours_of(date(2025, 11, 2))
    local = [h.astimezone(zone) for h in fall]
    assert len(fall) == 25 and [h.hour for h in local].count(1) == 2
    ones = [fs.serialize_partition(h) for h in fall if h.astimezone(zone).hour == 1]
    assert ones == ["2025-11-02T08:00:00Z", "2025-11-02T09:00:00Z"]  # distinct keys, UTC with Z
    spring = hours_of(date(2025, 3, 9))
    assert len(spring) == 23 and 2 not in [h.astimezone(zone).hour for h in spring]


def test_hours_of_a_half_hour_zone_start_on_its_own_hours():
    kolkata = fs.HourlyPartitions(start=datetime(2025, 1, 1), timezone="Asia/Kolkata")  # naive: local
    assert kolkata.start == datetime(2024, 12, 31, 18, 30, tzinfo=UTC)
    assert kolkata.validate("2025-01-01T04:30:00Z") == datetime(2025, 1, 1, 4, 30, tzinfo=UTC)
    with pytest.raises(fs.InvalidPartition, match="not on the hour in Asia/Kolkata"):
        kolkata.validate("2025-01-01T04:00:00Z")
    hours = kolkata.keys(end=kolkata.start + timedelta(hours=5))
    assert [h.astimezone(ZoneInfo("Asia/Kolkata")).minute for h in hours] == [0] * 6


@pytest.mark.parametrize("name", ["Mars/Olympus_Mons", "", "America/../etc", 5, "UTC\x00"])
def test_an_unknown_time_zone_is_refused(name):
    with pytest.raises(fs.InvalidPartition, match=r"timezone|time zone"):
        fs.DailyPartitions(start=date(2025, 1, 1), timezone=name)


def test_days_of_different_zones_do_not_map_onto_each_other():
    from flowstone.partitions import can_map

    utc_days = fs.DailyPartitions(start=date(2025, 1, 1))
    la_days = fs.DailyPartitions(start=date(2025, 1, 1), timezone=LA)
    assert can_map(la_days, fs.DailyPartitions(start=date(2025, 2, 1), timezone=LA))
    assert not can_map(utc_days, la_days) and not can_map(la_days, utc_days)
    assert la_days != utc_days


def test_yesterday_is_local():
    from flowstone import partitions

    keys_at = {}
    for zone in ("Pacific/Kiritimati", "Pacific/Pago_Pago"):  # UTC+14 and UTC-11: two dates apart at times
        daily = fs.DailyPartitions(start=date(2020, 1, 1), timezone=zone)
        keys_at[zone] = daily.keys()[-1]
    now = partitions._utcnow()
    assert keys_at["Pacific/Kiritimati"] == now.astimezone(ZoneInfo("Pacific/Kiritimati")).date() - timedelta(days=1)
    assert keys_at["Pacific/Pago_Pago"] == now.astimezone(ZoneInfo("Pacific/Pago_Pago")).date() - timedelta(days=1)
