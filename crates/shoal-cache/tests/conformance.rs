//! One or more tests per RFC 9111 / RFC 5861 / RFC 9211 rule, against a scripted origin with
//! an injected clock. Test names carry the section.

mod common;

use std::time::Duration;

use common::*;
use http::Method;
use shoal_cache::{CacheConfig, CacheResult, PolicyConfig};

const CC60: (&str, &str) = ("cache-control", "max-age=60");

#[tokio::test]
async fn rfc9111_3_fresh_response_is_stored_and_reused() {
    let h = Harness::new(Origin::fixed(200, &[CC60], "body"));
    let a = h.get("/a", &[]).await;
    assert_eq!(a.body(), "body");
    assert!(
        cache_status(&a).contains("fwd=uri-miss"),
        "{}",
        cache_status(&a)
    );
    assert!(cache_status(&a).contains("stored"));
    h.clock.advance(30);
    let b = h.get("/a", &[]).await;
    assert_eq!(b.body(), "body");
    assert_eq!(h.origin.calls(), 1);
    assert_eq!(hdr(&b, "age"), Some("30"));
    assert_eq!(cache_status(&b), "shoal; hit; ttl=30");
    assert_eq!(h.cache.counters().get(CacheResult::Hit), 1);
    assert_eq!(h.cache.counters().get(CacheResult::Miss), 1);
}

#[tokio::test]
async fn rfc9111_3_response_no_store_is_not_stored() {
    let h = Harness::new(Origin::fixed(
        200,
        &[("cache-control", "no-store, max-age=60")],
        "x",
    ));
    let a = h.get("/a", &[]).await;
    assert!(
        cache_status(&a).contains("detail=no-store"),
        "{}",
        cache_status(&a)
    );
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test]
async fn rfc9111_5_2_1_5_request_no_store_is_not_stored() {
    let h = Harness::new(Origin::fixed(200, &[CC60], "x"));
    h.get("/a", &[("cache-control", "no-store")]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
    // Request-side reasons leave no hit-for-pass behind: the second one was stored.
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test]
async fn rfc9111_5_2_2_7_private_is_not_stored_by_a_shared_cache() {
    let h = Harness::new(Origin::fixed(
        200,
        &[("cache-control", "private, max-age=60")],
        "x",
    ));
    h.get("/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test]
async fn rfc9111_5_2_2_7_private_with_field_names_stores_without_those_fields() {
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("cache-control", "private=\"x-user\", max-age=60"),
            ("x-user", "alice"),
            ("x-other", "kept"),
        ],
        "x",
    ));
    let first = h.get("/a", &[]).await;
    assert_eq!(
        hdr(&first, "x-user"),
        Some("alice"),
        "the miss forwards the origin's fields"
    );
    let b = h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
    assert_eq!(hdr(&b, "x-user"), None);
    assert_eq!(hdr(&b, "x-other"), Some("kept"));
}

#[tokio::test]
async fn rfc9111_5_2_2_4_no_cache_with_field_names_reuses_without_those_fields() {
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("cache-control", "no-cache=\"x-secret\", max-age=60"),
            ("x-secret", "s"),
        ],
        "x",
    ));
    h.get("/a", &[]).await;
    let b = h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
    assert_eq!(hdr(&b, "x-secret"), None);
}

#[tokio::test]
async fn rfc9111_5_2_2_4_unqualified_no_cache_validates_every_reuse() {
    let h = Harness::new(Origin::new(|_, req, _| {
        if req.get("if-none-match").is_some_and(|v| v == "\"e1\"") {
            return Ok(resp(304, &[("etag", "\"e1\"")], ""));
        }
        Ok(resp(
            200,
            &[
                ("cache-control", "no-cache, max-age=60"),
                ("etag", "\"e1\""),
            ],
            "body",
        ))
    }));
    h.get("/a", &[]).await;
    let b = h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
    assert_eq!(
        h.origin.last_request().1.get("if-none-match").unwrap(),
        "\"e1\""
    );
    assert_eq!(b.status(), 200);
    assert_eq!(b.body(), "body");
    assert!(
        cache_status(&b).contains("fwd-status=304"),
        "{}",
        cache_status(&b)
    );
    assert_eq!(h.cache.counters().get(CacheResult::Revalidated), 1);
}

#[tokio::test]
async fn rfc9111_3_only_get_responses_are_stored() {
    let h = Harness::new(Origin::fixed(200, &[CC60], "x"));
    h.send(Method::POST, "/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
    assert_eq!(h.cache.counters().get(CacheResult::Bypass), 1);
}

#[tokio::test]
async fn rfc9111_3_status_without_explicit_freshness_needs_heuristic_cacheability() {
    // 302 is not heuristically cacheable: not stored without explicit freshness...
    let h = Harness::new(Origin::fixed(
        302,
        &[("location", "/b"), ("last-modified", &date(-1000))],
        "",
    ));
    h.get("/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
    // ...but stored with it.
    let h = Harness::new(Origin::fixed(302, &[("location", "/b"), CC60], ""));
    h.get("/a", &[]).await;
    let b = h.get("/a", &[]).await;
    assert_eq!((h.origin.calls(), b.status().as_u16()), (1, 302));
}

#[tokio::test]
async fn rfc9111_3_partial_content_is_not_stored() {
    let h = Harness::new(Origin::fixed(
        206,
        &[CC60, ("content-range", "bytes 0-0/10")],
        "x",
    ));
    h.get("/a", &[("range", "bytes=0-0")]).await;
    h.get("/a", &[("range", "bytes=0-0")]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 3);
}

#[tokio::test]
async fn rfc9110_14_a_single_range_is_answered_from_a_stored_complete_response() {
    let h = Harness::new(Origin::fixed(
        200,
        &[
            CC60,
            ("etag", "\"v1\""),
            ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ],
        "0123456789",
    ));
    // A range miss goes to the origin as it is and stores nothing.
    let miss = h.get("/a", &[("range", "bytes=0-1")]).await;
    assert_eq!(h.origin.calls(), 1);
    assert_eq!(miss.status(), 200, "the origin's answer is passed on");
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
    let r = h.get("/a", &[("range", "bytes=2-4")]).await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.body(), "234");
    assert_eq!(hdr(&r, "content-range"), Some("bytes 2-4/10"));
    assert_eq!(hdr(&r, "content-length"), Some("3"));
    let r = h.get("/a", &[("range", "bytes=-3")]).await;
    assert_eq!((r.status().as_u16(), r.body().as_ref()), (206, &b"789"[..]));
    let r = h.get("/a", &[("range", "bytes=8-")]).await;
    assert_eq!((r.status().as_u16(), r.body().as_ref()), (206, &b"89"[..]));
    let r = h.get("/a", &[("range", "bytes=5-100")]).await;
    assert_eq!(hdr(&r, "content-range"), Some("bytes 5-9/10"));
    let r = h.get("/a", &[("range", "bytes=10-")]).await;
    assert_eq!(r.status(), 416);
    assert_eq!(hdr(&r, "content-range"), Some("bytes */10"));
    // Several ranges, another unit or an invalid range: the whole response.
    for v in ["bytes=0-1,3-4", "items=0-1", "bytes=x-y", "bytes=12-2"] {
        let r = h.get("/a", &[("range", v)]).await;
        assert_eq!((r.status().as_u16(), r.body().len()), (200, 10), "{v}");
    }
    // If-Range: a matching strong tag applies the range; another tag or a weak one gets all.
    let r = h
        .get("/a", &[("range", "bytes=0-0"), ("if-range", "\"v1\"")])
        .await;
    assert_eq!((r.status().as_u16(), r.body().as_ref()), (206, &b"0"[..]));
    for v in ["\"v2\"", "W/\"v1\"", "Mon, 01 Jan 2024 00:00:01 GMT"] {
        let r = h
            .get("/a", &[("range", "bytes=0-0"), ("if-range", v)])
            .await;
        assert_eq!((r.status().as_u16(), r.body().len()), (200, 10), "{v}");
    }
    let r = h
        .get(
            "/a",
            &[
                ("range", "bytes=0-0"),
                ("if-range", "Mon, 01 Jan 2024 00:00:00 GMT"),
            ],
        )
        .await;
    assert_eq!(r.status(), 206);
    assert_eq!(h.origin.calls(), 2, "every range answered from cache");
    // A range for a URL with nothing stored and `only-if-cached`: 504, nothing forwarded.
    let r = h
        .get(
            "/b",
            &[("range", "bytes=0-0"), ("cache-control", "only-if-cached")],
        )
        .await;
    assert_eq!(r.status(), 504);
    assert_eq!(h.origin.calls(), 2);
    // Stale: the range request goes to the origin.
    h.clock.advance(61);
    h.get("/a", &[("range", "bytes=0-0")]).await;
    assert_eq!(h.origin.calls(), 3);
}

#[tokio::test]
async fn rfc9213_targeted_cache_control_overrides_cache_control_and_expires() {
    // CDN-Cache-Control wins over Cache-Control (and Expires) for this cache.
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=60"),
        ],
        "x",
    ));
    h.get("/a", &[]).await;
    let b = h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
    assert_eq!(
        hdr(&b, "cache-control"),
        Some("no-store"),
        "passed on as it was"
    );
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=60"),
            ("cdn-cache-control", "no-store"),
        ],
        "x",
    ));
    h.get("/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("expires", "Thu, 01 Jan 2099 00:00:00 GMT"),
            ("cdn-cache-control", "max-age=0"),
        ],
        "x",
    ));
    h.get("/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2, "Expires does not apply either");
    // Surrogate-Control is obeyed too; CDN-Cache-Control comes first.
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=0"),
            ("surrogate-control", "max-age=60"),
        ],
        "x",
    ));
    h.get("/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("cdn-cache-control", "max-age=0"),
            ("surrogate-control", "max-age=60"),
        ],
        "x",
    ));
    h.get("/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
    // An invalid dictionary is ignored: Cache-Control applies.
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=60"),
            ("cdn-cache-control", "max-age=0, !bad"),
        ],
        "x",
    ));
    h.get("/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
    // A value of the wrong type voids that directive only (a string is not an integer).
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=60"),
            ("cdn-cache-control", "max-age=\"0\""),
        ],
        "x",
    ));
    h.get("/a", &[]).await;
    h.clock.advance(1);
    h.get("/a", &[]).await;
    assert_eq!(
        h.origin.calls(),
        2,
        "targeted field present: no freshness from it, stale"
    );
    // Surrogate-Control: names are case-insensitive; a directive targeted at another
    // surrogate is not shoal's, one targeted at shoal is.
    for (sc, calls) in [
        ("MaX-aGe=60", 1),
        ("max-age=60;other", 2),
        ("max-age=60;shoal", 1),
        ("max-age=0, max-age=60;shoal", 1),
    ] {
        let h = Harness::new(Origin::fixed(
            200,
            &[("cache-control", "no-store"), ("surrogate-control", sc)],
            "x",
        ));
        h.get("/a", &[]).await;
        h.get("/a", &[]).await;
        assert_eq!(h.origin.calls(), calls, "{sc}");
    }
    // Surrogate-Control without a caching directive (ESI's `content`) changes nothing:
    // Cache-Control's `private` still holds.
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("cache-control", "private, no-store"),
            ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
            ("surrogate-control", "content=\"ESI/1.0\""),
        ],
        "x",
    ));
    h.get("/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(
        h.origin.calls(),
        2,
        "an ESI-only Surrogate-Control made a private response shared"
    );
    // `max-age=N+M`: fresh for N.
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("cache-control", "no-store"),
            ("surrogate-control", "max-age=60+600"),
        ],
        "x",
    ));
    h.get("/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
    // The operator's own field comes before all of them.
    let mut policy = PolicyConfig::default();
    policy
        .targeted
        .insert(0, http::HeaderName::from_static("shoal-cache-control"));
    let cfg = CacheConfig {
        policy,
        ..Default::default()
    };
    let h = Harness::with(
        Origin::fixed(
            200,
            &[
                ("cdn-cache-control", "no-store"),
                ("shoal-cache-control", "max-age=60"),
            ],
            "x",
        ),
        cfg,
    );
    h.get("/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
}

#[tokio::test]
async fn rfc9111_3_1_hop_by_hop_fields_are_not_stored() {
    let h = Harness::new(Origin::fixed(
        200,
        &[
            CC60,
            ("connection", "x-conn-only"),
            ("x-conn-only", "1"),
            ("keep-alive", "timeout=5"),
            ("x-end-to-end", "1"),
        ],
        "x",
    ));
    h.get("/a", &[]).await;
    let b = h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
    for f in ["connection", "x-conn-only", "keep-alive"] {
        assert_eq!(hdr(&b, f), None, "{f} served from cache");
    }
    assert_eq!(hdr(&b, "x-end-to-end"), Some("1"));
}

#[tokio::test]
async fn rfc9111_3_5_authorization_needs_public_s_maxage_or_must_revalidate() {
    let auth = [("authorization", "Bearer t")];
    let h = Harness::new(Origin::fixed(200, &[CC60], "x"));
    h.get("/a", &auth).await;
    h.get("/a", &auth).await;
    assert_eq!(h.origin.calls(), 2);
    for cc in [
        "public, max-age=60",
        "s-maxage=60",
        "must-revalidate, max-age=60",
    ] {
        let h = Harness::new(Origin::fixed(200, &[("cache-control", cc)], "x"));
        h.get("/a", &auth).await;
        h.get("/a", &auth).await;
        assert_eq!(h.origin.calls(), 1, "{cc}");
    }
}

#[tokio::test]
async fn rfc9111_4_2_1_s_maxage_wins_over_max_age() {
    let h = Harness::new(Origin::fixed(
        200,
        &[("cache-control", "max-age=10, s-maxage=100")],
        "x",
    ));
    h.get("/a", &[]).await;
    h.clock.advance(50);
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
    h.clock.advance(51);
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test]
async fn rfc9111_4_2_1_max_age_wins_over_expires() {
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=100"),
            ("date", &date(0)),
            ("expires", &date(10)),
        ],
        "x",
    ));
    h.get("/a", &[]).await;
    h.clock.advance(50);
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
}

#[tokio::test]
async fn rfc9111_4_2_1_expires_minus_date_is_the_lifetime() {
    let h = Harness::new(Origin::fixed(
        200,
        &[("date", &date(0)), ("expires", &date(30))],
        "x",
    ));
    h.get("/a", &[]).await;
    h.clock.advance(29);
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
    h.clock.advance(2);
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test]
async fn rfc9111_4_2_1_invalid_expires_means_stale() {
    let h = Harness::new(Origin::fixed(
        200,
        &[("date", &date(0)), ("expires", "0"), ("etag", "\"v\"")],
        "x",
    ));
    h.get("/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test]
async fn rfc9111_4_2_2_heuristic_freshness_is_a_fraction_of_last_modified_age() {
    // Modified 1000 s before Date: 10% gives 100 s.
    let h = Harness::new(Origin::fixed(
        200,
        &[("date", &date(0)), ("last-modified", &date(-1000))],
        "x",
    ));
    h.get("/a", &[]).await;
    h.clock.advance(99);
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
    h.clock.advance(2);
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test]
async fn rfc9111_4_2_2_no_heuristic_freshness_when_status_is_not_heuristically_cacheable() {
    let h = Harness::new(Origin::fixed(
        307,
        &[
            ("date", &date(0)),
            ("last-modified", &date(-1000)),
            ("location", "/x"),
        ],
        "",
    ));
    h.get("/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test]
async fn rfc9111_4_2_3_age_counts_upstream_age_and_resident_time() {
    let h = Harness::new(Origin::fixed(200, &[CC60, ("age", "20")], "x"));
    h.get("/a", &[]).await;
    h.clock.advance(10);
    let b = h.get("/a", &[]).await;
    assert_eq!(hdr(&b, "age"), Some("30"));
    h.clock.advance(31);
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2, "stale after 60 s of total age");
}

#[tokio::test]
async fn rfc9111_4_2_3_age_counts_apparent_age_and_response_delay() {
    // Date 40 s before the response arrived: apparent age 40.
    let h = Harness::new(Origin::fixed(200, &[CC60, ("date", &date(-40))], "x"));
    h.get("/a", &[]).await;
    let b = h.get("/a", &[]).await;
    assert_eq!(hdr(&b, "age"), Some("40"));
    // The origin takes 5 s to answer: the delay adds to the upstream Age.
    let clock = Clock::new();
    let c2 = clock.clone();
    let origin = Origin::new(move |_, _, _| {
        c2.advance(5);
        Ok(resp(200, &[CC60, ("age", "3"), ("date", &date(5))], "x"))
    });
    let mut h = Harness::new(origin);
    h.clock = clock;
    h.get("/a", &[]).await;
    let b = h.get("/a", &[]).await;
    assert_eq!(hdr(&b, "age"), Some("8"));
}

#[tokio::test]
async fn rfc9111_4_1_vary_keeps_one_variant_per_request_value() {
    let h = Harness::new(Origin::new(|_, req, _| {
        let lang = req
            .get("accept-language")
            .map(|v| v.to_str().unwrap().to_string());
        let body = match lang.as_deref() {
            Some("de") => "hallo",
            Some(_) => "hello",
            None => "default",
        };
        Ok(resp(200, &[CC60, ("vary", "Accept-Language")], body))
    }));
    assert_eq!(
        h.get("/a", &[("accept-language", "de")]).await.body(),
        "hallo"
    );
    assert_eq!(
        h.get("/a", &[("accept-language", "en")]).await.body(),
        "hello"
    );
    let none = h.get("/a", &[]).await;
    assert_eq!(none.body(), "default");
    assert!(
        cache_status(&none).contains("fwd=vary-miss"),
        "{}",
        cache_status(&none)
    );
    assert_eq!(h.origin.calls(), 3);
    assert_eq!(
        h.get("/a", &[("accept-language", "de")]).await.body(),
        "hallo"
    );
    assert_eq!(
        h.get("/a", &[("accept-language", "en")]).await.body(),
        "hello"
    );
    assert_eq!(h.get("/a", &[]).await.body(), "default");
    assert_eq!(h.origin.calls(), 3);
}

#[tokio::test]
async fn rfc9111_4_1_vary_star_never_matches() {
    let h = Harness::new(Origin::fixed(200, &[CC60, ("vary", "*")], "x"));
    h.get("/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test]
async fn rfc9111_4_3_1_stale_object_is_validated_with_its_validators() {
    let lm = date(-3600);
    let lm2 = lm.clone();
    let h = Harness::new(Origin::new(move |_, req, _| {
        if req.get("if-none-match").is_some() {
            assert_eq!(req.get("if-modified-since").unwrap(), lm2.as_str());
            return Ok(resp(
                304,
                &[
                    ("etag", "\"v1\""),
                    ("cache-control", "max-age=60"),
                    ("x-new", "2"),
                ],
                "",
            ));
        }
        Ok(resp(
            200,
            &[
                ("cache-control", "max-age=10"),
                ("etag", "\"v1\""),
                ("last-modified", &lm2),
                ("x-new", "1"),
                ("content-length", "4"),
            ],
            "body",
        ))
    }));
    h.get("/a", &[]).await;
    h.clock.advance(11);
    let b = h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
    assert_eq!(b.status(), 200);
    assert_eq!(b.body(), "body");
    // §3.2: the 304's fields replace the stored ones; Content-Length stays.
    assert_eq!(hdr(&b, "x-new"), Some("2"));
    assert_eq!(hdr(&b, "content-length"), Some("4"));
    assert_eq!(hdr(&b, "last-modified"), Some(lm.as_str()));
    // The new freshness (max-age=60 from the 304) counts from the validation.
    h.clock.advance(50);
    let c = h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
    assert_eq!(hdr(&c, "age"), Some("50"));
}

#[tokio::test]
async fn rfc9111_3_2_a_304_for_the_validated_response_keeps_its_tag_and_body_fields() {
    let h = Harness::new(Origin::new(|_, req, n| {
        if req.get("if-none-match").is_some() {
            return Ok(resp(
                304,
                &[
                    ("etag", "\"other\""),
                    ("content-encoding", "br"),
                    ("content-range", "bytes 0-1/2"),
                    ("content-md5", "new"),
                    ("x-new", "2"),
                    ("cache-control", "max-age=10"),
                ],
                "",
            ));
        }
        let body = if n == 0 { "old" } else { "new" };
        Ok(resp(
            200,
            &[
                ("cache-control", "max-age=10"),
                ("etag", "\"v1\""),
                ("content-encoding", "gzip"),
                ("content-md5", "old"),
            ],
            body,
        ))
    }));
    h.get("/a", &[]).await;
    h.clock.advance(11);
    let b = h.get("/a", &[]).await;
    // The 304 answers the validation shoal sent for the stored response: served, updated,
    // with the stored tag and the fields describing the stored body.
    assert_eq!((b.status().as_u16(), b.body().as_ref()), (200, &b"old"[..]));
    assert_eq!(h.origin.calls(), 2);
    assert_eq!(hdr(&b, "etag"), Some("\"v1\""));
    assert_eq!(hdr(&b, "content-encoding"), Some("gzip"));
    assert_eq!(hdr(&b, "content-md5"), Some("old"));
    assert_eq!(hdr(&b, "content-range"), None);
    assert_eq!(hdr(&b, "x-new"), Some("2"));
    let c = h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2, "fresh again after the 304");
    assert_eq!(c.body(), "old");
}

#[tokio::test]
async fn rfc9111_4_3_2_client_if_none_match_is_answered_from_cache() {
    let h = Harness::new(Origin::fixed(
        200,
        &[CC60, ("etag", "\"v1\""), ("content-type", "text/plain")],
        "body",
    ));
    h.get("/a", &[]).await;
    let b = h.get("/a", &[("if-none-match", "\"zzz\", W/\"v1\"")]).await;
    assert_eq!(b.status(), 304);
    assert!(b.body().is_empty());
    assert_eq!(hdr(&b, "etag"), Some("\"v1\""));
    assert_eq!(hdr(&b, "content-type"), None);
    let c = h.get("/a", &[("if-none-match", "\"zzz\"")]).await;
    assert_eq!(
        (c.status().as_u16(), c.body().as_ref()),
        (200, &b"body"[..])
    );
    assert_eq!(h.origin.calls(), 1);
}

#[tokio::test]
async fn rfc9111_4_3_2_client_if_modified_since_is_answered_from_cache() {
    let h = Harness::new(Origin::fixed(
        200,
        &[CC60, ("last-modified", &date(-100))],
        "body",
    ));
    h.get("/a", &[]).await;
    assert_eq!(
        h.get("/a", &[("if-modified-since", &date(-50))])
            .await
            .status(),
        304
    );
    assert_eq!(
        h.get("/a", &[("if-modified-since", &date(-150))])
            .await
            .status(),
        200
    );
    assert_eq!(h.origin.calls(), 1);
}

#[tokio::test]
async fn rfc9111_4_3_2_conditional_miss_fetches_in_full_then_answers_304() {
    let h = Harness::new(Origin::new(|_, req, _| {
        assert!(
            req.get("if-none-match").is_none(),
            "the cache needs the full response"
        );
        Ok(resp(200, &[CC60, ("etag", "\"v1\"")], "body"))
    }));
    let a = h.get("/a", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(a.status(), 304);
    let b = h.get("/a", &[]).await;
    assert_eq!((b.status().as_u16(), h.origin.calls()), (200, 1));
    assert_eq!(b.body(), "body");
}

#[tokio::test]
async fn rfc9111_5_2_1_4_request_no_cache_forces_validation() {
    let h = Harness::new(Origin::new(|_, req, _| {
        if req.get("if-none-match").is_some() {
            return Ok(resp(304, &[("etag", "\"v1\"")], ""));
        }
        Ok(resp(200, &[CC60, ("etag", "\"v1\"")], "body"))
    }));
    h.get("/a", &[]).await;
    let b = h.get("/a", &[("cache-control", "no-cache")]).await;
    assert_eq!(h.origin.calls(), 2);
    assert!(
        cache_status(&b).contains("fwd=request"),
        "{}",
        cache_status(&b)
    );
    h.get("/a", &[("pragma", "no-cache")]).await;
    assert_eq!(
        h.origin.calls(),
        3,
        "Pragma: no-cache without Cache-Control counts"
    );
}

#[tokio::test]
async fn rfc9111_5_2_1_4_operator_can_ignore_request_no_cache() {
    let cfg = CacheConfig {
        policy: PolicyConfig {
            ignore_request_no_cache: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let h = Harness::with(Origin::fixed(200, &[CC60], "x"), cfg);
    h.get("/a", &[]).await;
    h.get("/a", &[("cache-control", "no-cache")]).await;
    assert_eq!(h.origin.calls(), 1);
}

#[tokio::test]
async fn rfc9111_5_2_1_1_request_max_age_limits_the_age_accepted() {
    let h = Harness::new(Origin::fixed(200, &[CC60], "x"));
    h.get("/a", &[]).await;
    h.clock.advance(20);
    h.get("/a", &[("cache-control", "max-age=30")]).await;
    assert_eq!(h.origin.calls(), 1);
    h.get("/a", &[("cache-control", "max-age=10")]).await;
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test]
async fn rfc9111_5_2_1_3_request_min_fresh_needs_that_much_freshness_left() {
    let h = Harness::new(Origin::fixed(200, &[CC60], "x"));
    h.get("/a", &[]).await;
    h.clock.advance(40);
    h.get("/a", &[("cache-control", "min-fresh=10")]).await;
    assert_eq!(h.origin.calls(), 1);
    h.get("/a", &[("cache-control", "min-fresh=30")]).await;
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test]
async fn rfc9111_5_2_1_2_request_max_stale_accepts_stale_responses() {
    let h = Harness::new(Origin::fixed(200, &[("cache-control", "max-age=10")], "x"));
    h.get("/a", &[]).await;
    h.clock.advance(15);
    let b = h.get("/a", &[("cache-control", "max-stale=10")]).await;
    assert_eq!(h.origin.calls(), 1);
    assert!(cache_status(&b).contains("ttl=-5"), "{}", cache_status(&b));
    h.get("/a", &[("cache-control", "max-stale=2")]).await;
    assert_eq!(h.origin.calls(), 2);
    h.clock.advance(1000);
    h.get("/a", &[("cache-control", "max-stale")]).await;
    assert_eq!(
        h.origin.calls(),
        2,
        "max-stale without a value accepts any staleness"
    );
    assert_eq!(h.cache.counters().get(CacheResult::Stale), 2);
}

#[tokio::test]
async fn rfc9111_5_2_2_2_must_revalidate_is_never_served_stale() {
    for cc in [
        "max-age=10, must-revalidate",
        "max-age=10, proxy-revalidate",
        "s-maxage=10",
    ] {
        let h = Harness::new(Origin::fixed(200, &[("cache-control", cc)], "x"));
        h.get("/a", &[]).await;
        h.clock.advance(15);
        h.get("/a", &[("cache-control", "max-stale=100")]).await;
        assert_eq!(h.origin.calls(), 2, "{cc}");
    }
}

#[tokio::test]
async fn rfc9111_5_2_1_7_only_if_cached_answers_504_without_a_stored_response() {
    let h = Harness::new(Origin::fixed(200, &[("cache-control", "max-age=10")], "x"));
    let a = h.get("/a", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(a.status(), 504);
    assert_eq!(h.origin.calls(), 0);
    h.get("/a", &[]).await;
    let b = h.get("/a", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(b.status(), 200);
    h.clock.advance(20);
    let c = h.get("/a", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(c.status(), 504, "stale and not allowed stale");
    assert_eq!(h.origin.calls(), 1);
}

#[tokio::test]
async fn rfc9111_5_2_2_3_must_understand_overrides_no_store_for_known_statuses() {
    let h = Harness::new(Origin::fixed(
        200,
        &[("cache-control", "must-understand, no-store, max-age=60")],
        "x",
    ));
    h.get("/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
    let h = Harness::new(Origin::fixed(
        299,
        &[("cache-control", "must-understand, no-store, max-age=60")],
        "x",
    ));
    h.get("/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test]
async fn rfc5861_3_stale_while_revalidate_serves_stale_and_refreshes_once() {
    let h = Harness::new(Origin::new(|_, _, n| {
        Ok(resp(
            200,
            &[("cache-control", "max-age=10, stale-while-revalidate=60")],
            if n == 0 { "v0" } else { "v1" },
        ))
    }));
    h.get("/a", &[]).await;
    h.clock.advance(15);
    let (b, c) = tokio::join!(h.get("/a", &[]), h.get("/a", &[]));
    assert_eq!(
        (b.body().as_ref(), c.body().as_ref()),
        (&b"v0"[..], &b"v0"[..])
    );
    assert!(
        cache_status(&b).contains("detail=stale-while-revalidate"),
        "{}",
        cache_status(&b)
    );
    // Let the background refresh run.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(h.origin.calls(), 2, "exactly one background refresh");
    let d = h.get("/a", &[]).await;
    assert_eq!(d.body(), "v1");
    assert_eq!(h.origin.calls(), 2);
    // Past the window: a synchronous fetch.
    h.clock.advance(100);
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 3);
}

#[tokio::test]
async fn rfc5861_4_stale_if_error_serves_stale_on_5xx_and_unreachable_origin() {
    let h = Harness::new(Origin::fixed(
        200,
        &[("cache-control", "max-age=10, stale-if-error=60")],
        "good",
    ));
    h.get("/a", &[]).await;
    h.clock.advance(20);
    h.origin.set(|_, _, _| Ok(resp(503, &[], "down")));
    let b = h.get("/a", &[]).await;
    assert_eq!(
        (b.status().as_u16(), b.body().as_ref()),
        (200, &b"good"[..])
    );
    assert!(
        cache_status(&b).contains("fwd-status=503"),
        "{}",
        cache_status(&b)
    );
    h.origin.set(|_, _, _| Err("connection refused".into()));
    let c = h.get("/a", &[]).await;
    assert_eq!(c.body(), "good");
    // Beyond the window the error goes through.
    h.clock.advance(60);
    h.origin.set(|_, _, _| Ok(resp(503, &[], "down")));
    assert_eq!(h.get("/a", &[]).await.status(), 503);
    // 404 is not an error stale-if-error covers.
    let h = Harness::new(Origin::fixed(
        200,
        &[("cache-control", "max-age=10, stale-if-error=60")],
        "good",
    ));
    h.get("/a", &[]).await;
    h.clock.advance(20);
    h.origin.set(|_, _, _| Ok(resp(404, &[], "gone")));
    assert_eq!(h.get("/a", &[]).await.status(), 404);
}

#[tokio::test]
async fn rfc9111_4_2_4_operator_stale_on_error_window_respects_must_revalidate() {
    let cfg = CacheConfig {
        policy: PolicyConfig {
            stale_if_error: Duration::from_secs(300),
            ..Default::default()
        },
        ..Default::default()
    };
    for (cc, served_stale) in [("max-age=10", true), ("max-age=10, must-revalidate", false)] {
        let h = Harness::with(
            Origin::fixed(200, &[("cache-control", cc)], "good"),
            cfg.clone(),
        );
        h.get("/a", &[]).await;
        h.clock.advance(20);
        h.origin.set(|_, _, _| Err("connection reset".into()));
        let r = h.get("/a", &[]).await;
        assert_eq!(r.status() == 200, served_stale, "{cc}: {}", r.status());
    }
}

#[tokio::test]
async fn rfc5861_4_request_stale_if_error() {
    let h = Harness::new(Origin::fixed(
        200,
        &[("cache-control", "max-age=10")],
        "good",
    ));
    h.get("/a", &[]).await;
    h.clock.advance(20);
    h.origin.set(|_, _, _| Ok(resp(500, &[], "bad")));
    assert_eq!(h.get("/a", &[]).await.status(), 500);
    assert_eq!(
        h.get("/a", &[("cache-control", "stale-if-error=30")])
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn rfc9111_4_3_1_a_validation_carries_only_the_stored_validators() {
    // A stored response with Last-Modified only: a client's own `If-None-Match: *` (on HEAD,
    // which keeps client conditionals otherwise) must not reach the origin with it, or the
    // origin's 304 would freshen the stale object for everyone.
    let h = Harness::new(Origin::new(|_, req, _| {
        if req.get("if-none-match").is_some() {
            return Ok(resp(304, &[("cache-control", "max-age=3600")], ""));
        }
        Ok(resp(
            200,
            &[
                ("cache-control", "max-age=10"),
                ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
            ],
            "old",
        ))
    }));
    h.get("/a", &[]).await;
    h.clock.advance(11);
    h.send(Method::HEAD, "/a", &[("if-none-match", "*")]).await;
    let (_, sent) = h.origin.last_request();
    assert!(sent.get("if-none-match").is_none(), "{sent:?}");
    assert!(sent.get("if-modified-since").is_some(), "{sent:?}");
}

#[tokio::test]
async fn cache_a_cookie_set_on_a_304_goes_to_that_client_only() {
    let h = Harness::new(Origin::new(|_, req, n| {
        if req.get("if-none-match").is_some() {
            return Ok(resp(
                304,
                &[
                    ("cache-control", "max-age=10"),
                    ("set-cookie", "sid=renewed"),
                ],
                "",
            ));
        }
        let _ = n;
        Ok(resp(
            200,
            &[("cache-control", "max-age=10"), ("etag", "\"v\"")],
            "body",
        ))
    }));
    h.get("/a", &[]).await;
    h.clock.advance(11);
    let b = h.get("/a", &[]).await;
    assert_eq!(b.body(), "body");
    assert_eq!(hdr(&b, "set-cookie"), Some("sid=renewed"));
    let c = h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
    assert_eq!(hdr(&c, "set-cookie"), None, "the renewed cookie was stored");
}

#[tokio::test]
async fn rfc9111_4_2_4_request_directives_never_loosen_must_revalidate_or_no_cache() {
    for cc in [
        "max-age=10, must-revalidate",
        "max-age=10, proxy-revalidate",
        "s-maxage=10",
        "max-age=10, no-cache",
    ] {
        let h = Harness::new(Origin::fixed(
            200,
            &[("cache-control", cc), ("etag", "\"v\"")],
            "good",
        ));
        h.get("/a", &[]).await;
        h.clock.advance(20);
        h.origin.set(|_, _, _| Ok(resp(503, &[], "bad")));
        for req in ["stale-if-error=3600", "max-stale=3600", "max-stale"] {
            let r = h.get("/a", &[("cache-control", req)]).await;
            assert_eq!(r.status(), 503, "{cc} with request {req}");
        }
        // Unreachable origin: the same.
        h.origin.set(|_, _, _| Err("refused".to_string()));
        let r = h
            .get("/a", &[("cache-control", "stale-if-error=3600")])
            .await;
        assert_eq!(r.status(), 502, "{cc}: stale served on a connection error");
    }
}

#[tokio::test]
async fn rfc9111_4_4_unsafe_methods_invalidate_the_target_and_same_origin_locations() {
    let h = Harness::new(Origin::new(|m, _, _| {
        if m == Method::POST {
            return Ok(resp(
                201,
                &[
                    ("location", "/b"),
                    ("content-location", "http://other.test/c"),
                ],
                "",
            ));
        }
        Ok(resp(200, &[CC60], "x"))
    }));
    for p in ["/a", "/b", "/c"] {
        h.get(p, &[]).await;
    }
    assert_eq!(h.origin.calls(), 3);
    h.send(Method::POST, "/a", &[]).await;
    h.get("/a", &[]).await;
    h.get("/b", &[]).await;
    h.get("/c", &[]).await;
    // /a and /b refetched, /c (the other host's path) still cached.
    assert_eq!(h.origin.calls(), 4 + 2);
}

#[tokio::test]
async fn rfc9111_4_4_failed_unsafe_requests_do_not_invalidate() {
    let h = Harness::new(Origin::new(|m, _, _| {
        if m == Method::DELETE {
            return Ok(resp(500, &[], ""));
        }
        Ok(resp(200, &[CC60], "x"))
    }));
    h.get("/a", &[]).await;
    h.send(Method::DELETE, "/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test]
async fn rfc9110_9_3_2_head_is_answered_from_a_stored_get() {
    let h = Harness::new(Origin::fixed(200, &[CC60, ("content-length", "4")], "body"));
    h.get("/a", &[]).await;
    let b = h.send(Method::HEAD, "/a", &[]).await;
    assert_eq!(b.status(), 200);
    assert!(b.body().is_empty());
    assert_eq!(hdr(&b, "content-length"), Some("4"));
    assert_eq!(h.origin.calls(), 1);
    // A HEAD miss goes through as HEAD and stores nothing.
    let h = Harness::new(Origin::fixed(200, &[CC60], ""));
    h.send(Method::HEAD, "/a", &[]).await;
    assert_eq!(h.origin.last_request().0, Method::HEAD);
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test]
async fn rfc9111_4_3_5_head_response_freshens_the_stored_get() {
    let h = Harness::new(Origin::new(|m, _, _| {
        if m == Method::HEAD {
            return Ok(resp(
                200,
                &[
                    ("cache-control", "max-age=1000"),
                    ("etag", "\"v1\""),
                    ("x-a", "2"),
                ],
                "",
            ));
        }
        Ok(resp(
            200,
            &[
                ("cache-control", "max-age=10"),
                ("etag", "\"v1\""),
                ("x-a", "1"),
            ],
            "body",
        ))
    }));
    h.get("/a", &[]).await;
    h.clock.advance(20);
    let head = h.send(Method::HEAD, "/a", &[]).await;
    assert_eq!(h.origin.last_request().0, Method::HEAD);
    assert!(head.body().is_empty());
    let b = h.get("/a", &[]).await;
    assert_eq!(
        h.origin.calls(),
        2,
        "the GET was answered from the freshened object"
    );
    assert_eq!(
        (hdr(&b, "x-a"), b.body().as_ref()),
        (Some("2"), &b"body"[..])
    );
    // A HEAD answer for another representation (other ETag) does not touch it.
    h.clock.advance(2000);
    h.origin.set(|_, _, _| {
        Ok(resp(
            200,
            &[("cache-control", "max-age=1000"), ("etag", "\"v2\"")],
            "",
        ))
    });
    h.send(Method::HEAD, "/a", &[]).await;
    h.origin.set(|_, _, _| {
        Ok(resp(
            200,
            &[("cache-control", "max-age=1000"), ("etag", "\"v2\"")],
            "new",
        ))
    });
    assert_eq!(h.get("/a", &[]).await.body(), "new");
}

#[tokio::test]
async fn rfc9211_cache_status_is_appended_after_upstream_members() {
    let h = Harness::new(Origin::fixed(
        200,
        &[CC60, ("cache-status", "origin-cache; hit")],
        "x",
    ));
    let a = h.get("/a", &[]).await;
    assert_eq!(
        cache_status(&a),
        "origin-cache; hit, shoal; fwd=uri-miss; fwd-status=200; stored"
    );
    let b = h.get("/a", &[]).await;
    assert_eq!(cache_status(&b), "origin-cache; hit, shoal; hit; ttl=60");
    let c = h.send(Method::PUT, "/a", &[]).await;
    assert_eq!(
        cache_status(&c),
        "origin-cache; hit, shoal; fwd=bypass; fwd-status=200"
    );
}

#[tokio::test]
async fn cache_set_cookie_responses_pass_by_default_and_are_stored_without_the_cookie_on_request() {
    let origin = || Origin::fixed(200, &[CC60, ("set-cookie", "sid=secret0")], "x");
    // Default: not stored (hit-for-pass); each client gets the origin's own answer.
    let h = Harness::new(origin());
    let a = h.get("/a", &[]).await;
    assert_eq!(hdr(&a, "set-cookie"), Some("sid=secret0"));
    let b = h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
    assert!(
        cache_status(&b).contains("detail=hit-for-pass"),
        "{}",
        cache_status(&b)
    );
    // Opted in: a copy without Set-Cookie is stored; the cookie went to the first client only.
    let cfg = CacheConfig {
        policy: PolicyConfig {
            store_set_cookie: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let h = Harness::with(origin(), cfg);
    let a = h.get("/a", &[]).await;
    assert_eq!(hdr(&a, "set-cookie"), Some("sid=secret0"));
    let b = h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
    assert_eq!(
        hdr(&b, "set-cookie"),
        None,
        "a cookie is never replayed to another client"
    );
}

#[tokio::test]
async fn cache_bodies_over_the_object_limit_stream_through_uncached() {
    let cfg = CacheConfig {
        max_object_size: 8,
        ..Default::default()
    };
    let h = Harness::with(
        Origin::fixed(200, &[CC60, ("content-length", "10")], "0123456789"),
        cfg.clone(),
    );
    h.get("/a", &[]).await;
    let b = h.get("/a", &[]).await;
    assert_eq!(b.body(), "0123456789");
    assert_eq!(h.origin.calls(), 2);
    assert!(
        cache_status(&b).contains("fwd=bypass"),
        "{}",
        cache_status(&b)
    );
    // Unknown length, found too large while buffering.
    let h = Harness::with(Origin::fixed(200, &[CC60], "0123456789"), cfg);
    h.get("/a", &[]).await;
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
    assert!(h.cache.store().stats().too_large >= 1);
}

#[tokio::test]
async fn cache_default_ttl_and_max_ttl_are_operator_overrides() {
    let cfg = CacheConfig {
        policy: PolicyConfig {
            default_ttl: Duration::from_secs(30),
            max_ttl: Duration::from_secs(100),
            ..Default::default()
        },
        ..Default::default()
    };
    let h = Harness::with(Origin::fixed(200, &[], "x"), cfg.clone());
    h.get("/a", &[]).await;
    h.clock.advance(29);
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
    let h = Harness::with(
        Origin::fixed(200, &[("cache-control", "max-age=1000")], "x"),
        cfg,
    );
    h.get("/a", &[]).await;
    h.clock.advance(101);
    h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test]
async fn cache_counts_each_request_once_by_result() {
    let h = Harness::new(Origin::new(|m, req, _| {
        if m == Method::POST {
            return Ok(resp(200, &[], ""));
        }
        if req.get("if-none-match").is_some() {
            return Ok(resp(304, &[("etag", "\"v\"")], ""));
        }
        Ok(resp(
            200,
            &[
                ("cache-control", "max-age=10, stale-while-revalidate=5"),
                ("etag", "\"v\""),
            ],
            "x",
        ))
    }));
    h.get("/a", &[]).await; // miss
    h.get("/a", &[]).await; // hit
    h.clock.advance(12);
    h.get("/a", &[]).await; // stale (and one background refresh, not counted)
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    h.clock.advance(30);
    h.get("/a", &[]).await; // revalidated
    h.send(Method::POST, "/b", &[]).await; // bypass
    let c = h.cache.counters();
    let got: Vec<u64> = CacheResult::ALL.iter().map(|&r| c.get(r)).collect();
    // hit, miss, stale, revalidated, bypass
    assert_eq!(got, [1, 1, 1, 1, 1]);
}

// Cases from the cache-tests suite (cache-tests.fyi), as a shared cache sees them.

/// Stores one response for `/a` with `headers` (and Date now), advances `secs`, asks again:
/// true if the second answer came from cache.
async fn reused_after(status: u16, headers: &[(&str, &str)], secs: u64) -> bool {
    let d = date(0);
    let mut h: Vec<(&str, &str)> = vec![("date", d.as_str())];
    h.extend_from_slice(headers);
    let owned: Vec<(String, String)> = h
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    let origin = Origin::new(move |_, _, _| {
        let pairs: Vec<(&str, &str)> = owned
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        Ok(resp(status, &pairs, "x"))
    });
    let h = Harness::new(origin);
    h.get("/a", &[]).await;
    h.clock.advance(secs);
    h.get("/a", &[]).await;
    h.origin.calls() == 1
}

#[tokio::test]
async fn rfc9111_5_1_age_uses_the_first_member_of_the_first_line() {
    let cc = ("cache-control", "max-age=3600");
    // age-parse-suffix / -prefix / -suffix-twoline / -prefix-twoline / -dup-0.
    assert!(!reused_after(200, &[cc, ("age", "7200, 0")], 0).await);
    assert!(reused_after(200, &[cc, ("age", "0, 7200")], 0).await);
    assert!(!reused_after(200, &[cc, ("age", "7200"), ("age", "0")], 0).await);
    assert!(reused_after(200, &[cc, ("age", "0"), ("age", "7200")], 0).await);
    assert!(reused_after(200, &[cc, ("age", "0, 0")], 0).await);
    // A parameter does not hide the number (age-parse-parameter).
    assert!(!reused_after(200, &[cc, ("age", "7200;foo=bar")], 0).await);
}

#[tokio::test]
async fn rfc9111_5_1_invalid_age_is_ignored_and_huge_age_is_stale() {
    let cc = ("cache-control", "max-age=3600");
    for bad in ["abc", "-7200", "7200.0"] {
        assert!(reused_after(200, &[cc, ("age", bad)], 0).await, "{bad}");
    }
    for huge in ["2147483647", "2147483648", "2147483649"] {
        assert!(!reused_after(200, &[cc, ("age", huge)], 0).await, "{huge}");
    }
}

#[tokio::test]
async fn rfc9111_5_2_cache_control_parsing_quirks() {
    // Quoted value; max-age inside another directive's quoted string is not max-age.
    assert!(reused_after(200, &[("cache-control", "max-age=\"3600\"")], 10).await);
    let quoted = [("cache-control", "extension=\"max-age=3600\", max-age=1")];
    assert!(!reused_after(200, &quoted, 10).await);
    let quoted = [("cache-control", "max-age=1, extension=\"max-age=3600\"")];
    assert!(!reused_after(200, &quoted, 10).await);
    // Single quotes are not quotes; leading zeros are digits.
    assert!(!reused_after(200, &[("cache-control", "max-age='3600'")], 10).await);
    assert!(reused_after(200, &[("cache-control", "max-age=003600")], 10).await);
    // Duplicates: the first wins, on one line or two.
    assert!(reused_after(200, &[("cache-control", "max-age=1800, max-age=1")], 10).await);
    let two = [
        ("cache-control", "max-age=1800"),
        ("cache-control", "max-age=1"),
    ];
    assert!(reused_after(200, &two, 10).await);
    // Directive names are case-insensitive.
    assert!(!reused_after(200, &[("cache-control", "No-StOrE, max-age=60")], 0).await);
    // Whitespace around `=` is not the delta-seconds syntax: the value is invalid (stale).
    assert!(!reused_after(200, &[("cache-control", "max-age =3600")], 10).await);
    assert!(!reused_after(200, &[("cache-control", "max-age= 3600")], 10).await);
}

#[tokio::test]
async fn rfc9111_5_3_expires_accepts_the_three_http_date_formats_only() {
    let future = |v: &'static str| [("expires", v)];
    for ok in [
        "Thu, 18 Aug 2050 02:01:18 GMT",
        "Tue, 19 Jan 2038 14:14:08 GMT",
        "Sun, 21 Nov 2286 04:46:39 GMT",
        "Thursday, 18-Aug-50 02:01:18 GMT",
        "Thu Aug  8 02:01:18 2050",
    ] {
        assert!(reused_after(200, &future(ok), 10).await, "{ok}");
    }
    for bad in [
        "Thu, 18 Aug 2050 02:01:18 UTC",
        "Thu, 18 Aug 2050 02:01:18 AEST",
        "Thu, 18 Aug 50 02:01:18 GMT",
        "Thu 18 Aug 2050 02:01:18 GMT",
        "Thu, 18  Aug  2050 02:01:18 GMT",
        "Thu, 18-Aug-2050 02:01:18 GMT",
        "Thu, 18 Aug 2050 02.01.18 GMT",
        "Thu, 18 Aug 2050 2:01:18 GMT",
    ] {
        assert!(!reused_after(200, &future(bad), 10).await, "{bad}");
    }
}

#[tokio::test]
async fn rfc9111_3_explicit_freshness_makes_any_final_status_storable() {
    for status in [
        200, 203, 204, 299, 301, 302, 303, 307, 308, 400, 404, 410, 499, 500, 502, 503, 504, 599,
    ] {
        let fresh = [("cache-control", "max-age=100000")];
        assert!(reused_after(status, &fresh, 10).await, "{status} fresh");
        let stale = [
            ("expires", &*date(-5000)),
            ("last-modified", &*date(-100000)),
        ];
        assert!(!reused_after(status, &stale, 0).await, "{status} stale");
    }
    // must-understand: stored despite no-store only for a status shoal understands.
    let mu = [("cache-control", "max-age=3600, no-store, must-understand")];
    assert!(reused_after(200, &mu, 0).await);
    assert!(!reused_after(599, &mu, 0).await);
}

#[tokio::test]
async fn rfc9111_3_1_connection_listed_and_proxy_auth_fields_are_not_stored() {
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=3600"),
            ("connection", "a, b"),
            ("a", "1"),
            ("b", "2"),
            ("c", "3"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authentication-info", "x"),
            ("proxy-connection", "keep-alive"),
            ("content-location", "/foo"),
        ],
        "x",
    ));
    h.get("/a", &[]).await;
    let r = h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
    for gone in [
        "a",
        "b",
        "connection",
        "proxy-authenticate",
        "proxy-authentication-info",
        "proxy-connection",
    ] {
        assert_eq!(hdr(&r, gone), None, "{gone}");
    }
    assert_eq!(hdr(&r, "c"), Some("3"));
    assert_eq!(hdr(&r, "set-cookie"), None, "cookies are never replayed");
    assert_eq!(hdr(&r, "content-location"), Some("/foo"));
}

#[tokio::test]
async fn rfc9111_3_2_a_304_updates_stored_fields_but_not_content_length() {
    let h = Harness::new(Origin::new(|_, req, n| {
        if n == 0 {
            return Ok(resp(
                200,
                &[
                    ("cache-control", "max-age=2"),
                    ("etag", "\"e\""),
                    ("test-header", "A"),
                    ("content-type", "text/plain"),
                    ("x-frame-options", "deny"),
                ],
                "0123456789",
            ));
        }
        assert_eq!(req["if-none-match"], "\"e\"");
        Ok(resp(
            304,
            &[
                ("cache-control", "max-age=3600"),
                ("etag", "\"e\""),
                ("test-header", "B"),
                ("content-type", "text/plain;charset=utf-8"),
                ("x-frame-options", "sameorigin"),
                ("content-length", "36"),
            ],
            "",
        ))
    }));
    h.get("/a", &[]).await;
    h.clock.advance(5);
    let v = h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2);
    let c = h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 2, "fresh again for an hour");
    for r in [&v, &c] {
        assert_eq!(hdr(r, "test-header"), Some("B"));
        assert_eq!(hdr(r, "content-type"), Some("text/plain;charset=utf-8"));
        assert_eq!(hdr(r, "x-frame-options"), Some("sameorigin"));
        assert_eq!(hdr(r, "content-length"), Some("10"));
        assert_eq!(r.body(), "0123456789");
    }
}

#[tokio::test]
async fn rfc9111_4_4_relative_location_and_content_location_are_invalidated() {
    let h = Harness::new(Origin::new(|m, _, _| {
        if *m != Method::GET {
            return Ok(resp(
                200,
                &[
                    ("location", "location_target"),
                    ("content-location", "../up/cl_target?x=1"),
                ],
                "",
            ));
        }
        Ok(resp(200, &[CC60], "x"))
    }));
    for p in ["/dir/location_target", "/up/cl_target?x=1", "/dir/other"] {
        h.get(p, &[]).await;
    }
    assert_eq!(h.origin.calls(), 3);
    // M-SEARCH: any method cache-tests calls unsafe invalidates too.
    let m_search = Method::from_bytes(b"M-SEARCH").unwrap();
    h.send(m_search, "/dir/page", &[]).await;
    for p in ["/dir/location_target", "/up/cl_target?x=1", "/dir/other"] {
        h.get(p, &[]).await;
    }
    // Both targets refetched; /dir/other still cached.
    assert_eq!(h.origin.calls(), 4 + 2);
}

#[tokio::test]
async fn rfc9111_4_1_vary_star_anywhere_never_matches() {
    for vary in [
        &[("vary", "*, *")][..],
        &[("vary", ", *")],
        &[("vary", ""), ("vary", "*")],
        &[("vary", "Foo, *")],
    ] {
        let mut hs = vec![("cache-control", "max-age=5000")];
        hs.extend_from_slice(vary);
        assert!(!reused_after(200, &hs, 0).await, "{vary:?}");
    }
}

#[tokio::test]
async fn rfc9111_4_2_1_expires_age_and_date_are_served_as_stored_plus_age() {
    // other-age-update-expires / other-date-update.
    let d = date(0);
    let e = date(30 * 86_400);
    let h = Harness::new(Origin::fixed(
        200,
        &[("date", &d), ("expires", &e), ("age", "30")],
        "x",
    ));
    h.get("/a", &[]).await;
    h.clock.advance(3);
    let r = h.get("/a", &[]).await;
    assert_eq!(h.origin.calls(), 1);
    assert_eq!(hdr(&r, "age"), Some("33"));
    assert_eq!(hdr(&r, "date"), Some(d.as_str()));
    assert_eq!(hdr(&r, "expires"), Some(e.as_str()));
}

#[tokio::test]
async fn rfc9110_13_2_2_if_none_match_wins_over_if_modified_since_and_matches_any_listed_tag() {
    let (d, lm) = (date(0), date(-5000));
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=100000"),
            ("date", &d),
            ("etag", "\"abcdef\""),
            ("last-modified", &lm),
        ],
        "x",
    ));
    h.get("/a", &[]).await;
    // If-Modified-Since alone (before Last-Modified) would say "modified".
    let before_lm = date(-6000);
    let r = h
        .get(
            "/a",
            &[
                ("if-none-match", "\"abcdef\""),
                ("if-modified-since", &before_lm),
            ],
        )
        .await;
    assert_eq!(r.status(), 304);
    assert_eq!(
        hdr(&r, "etag"),
        Some("\"abcdef\""),
        "a 304 carries the ETag"
    );
    let r = h
        .get("/a", &[("if-none-match", "\"1234\", \"abcdef\", \"5678\"")])
        .await;
    assert_eq!(r.status(), 304);
    let r = h.get("/a", &[("if-none-match", "\"1234\"")]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.origin.calls(), 1);
}

#[tokio::test]
async fn rfc9111_4_3_1_a_variant_for_other_vary_values_is_not_used_to_validate() {
    let d = date(0);
    let e = date(1);
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("date", &d),
            ("expires", &e),
            ("etag", "\"abcdef\""),
            ("vary", "Abc"),
        ],
        "x",
    ));
    h.get("/a", &[("abc", "123")]).await;
    h.clock.advance(5);
    h.get("/a", &[("abc", "456")]).await;
    let (_, sent) = h.origin.last_request();
    assert!(sent.get("if-none-match").is_none(), "{sent:?}");
    // The matching variant, stale, is validated with its ETag and the Vary field sent along.
    h.get("/a", &[("abc", "123")]).await;
    let (_, sent) = h.origin.last_request();
    assert_eq!(sent["if-none-match"], "\"abcdef\"");
    assert_eq!(sent["abc"], "123");
}
