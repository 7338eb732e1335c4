//! Exchanges against RFC 7677's example and against the client in
//! `postgres-protocol` (what tokio-postgres uses).

use super::*;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// RFC 7677 section 3.
const RFC_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
const RFC_SERVER_FIRST: &str = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
    s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
const RFC_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
    p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

fn rfc_secret() -> ScramSecret {
    let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
    ScramSecret::from_password("pencil", &salt, 4096).unwrap()
}

/// A cheap secret for tests that run many exchanges.
fn fast_secret(password: &str) -> ScramSecret {
    ScramSecret::from_password(password, b"0123456789abcdef", 16).unwrap()
}

fn rfc_after_first() -> ScramAwaitingFinal {
    ScramServer::with_nonce(rfc_secret(), RFC_SERVER_NONCE)
        .unwrap()
        .client_first(RFC_CLIENT_FIRST.as_bytes())
        .unwrap()
}

#[test]
fn rfc7677_example() {
    let server = rfc_after_first();
    assert_eq!(server.server_first_message(), RFC_SERVER_FIRST.as_bytes());
    let server_final = server.client_final(RFC_CLIENT_FINAL.as_bytes()).unwrap();
    assert_eq!(server_final, RFC_SERVER_FINAL.as_bytes());
}

/// Runs a whole exchange with the `postgres-protocol` client. Returns the
/// server's error, or whether the client accepted the server-final message.
fn exchange(
    server: ScramServer,
    password: &str,
    channel_binding: ChannelBinding,
) -> Result<bool, ScramError> {
    let mut client = ScramSha256::new(password.as_bytes(), channel_binding);
    let server = server.client_first(client.message())?;
    client.update(server.server_first_message()).unwrap();
    let server_final = server.client_final(client.message())?;
    Ok(client.finish(&server_final).is_ok())
}

#[test]
fn postgres_protocol_client_with_right_password() {
    let secret = ScramSecret::generate("correct horse").unwrap();
    for channel_binding in [ChannelBinding::unsupported(), ChannelBinding::unrequested()] {
        let server = ScramServer::new(secret.clone());
        assert_eq!(exchange(server, "correct horse", channel_binding), Ok(true));
    }
}

/// Passwords SASLprep changes: full-width letters and a Roman numeral (NFKC), a no-break space
/// (mapped to a space), a soft hyphen (mapped to nothing). postgres-protocol's client prepares
/// them, as libpq does; the secrets the proxy derives must match, the generated ones and the
/// fixed-salt ones alike.
#[test]
fn postgres_protocol_client_with_a_password_saslprep_changes() {
    for password in ["ｐａｓｓｗｏｒｄ", "Ⅸ lives", "a\u{a0}b", "soft\u{ad}hyphen"] {
        for secret in [ScramSecret::generate(password).unwrap(), fast_secret(password)] {
            let server = ScramServer::new(secret);
            assert_eq!(
                exchange(server, password, ChannelBinding::unsupported()),
                Ok(true),
                "{password:?}"
            );
        }
    }
    assert_eq!(fast_secret("ｐａｓｓ"), fast_secret("pass"));
}

#[test]
fn postgres_protocol_client_with_stored_secret() {
    let stored = rfc_secret().to_string();
    let server = ScramServer::new(ScramSecret::parse(&stored).unwrap());
    assert_eq!(
        exchange(server, "pencil", ChannelBinding::unsupported()),
        Ok(true)
    );
}

#[test]
fn postgres_protocol_client_with_wrong_password() {
    let secret = fast_secret("correct horse");
    for password in ["wrong", "", "correct horse ", "Correct horse"] {
        let server = ScramServer::new(secret.clone());
        assert_eq!(
            exchange(server, password, ChannelBinding::unsupported()),
            Err(ScramError::InvalidProof),
            "{password:?}"
        );
    }
}

#[test]
fn postgres_protocol_client_refuses_a_server_with_the_wrong_server_key() {
    let mut secret = fast_secret("pw");
    secret.server_key[0] ^= 1;
    let server = ScramServer::new(secret);
    assert_eq!(exchange(server, "pw", ChannelBinding::unsupported()), Ok(false));
}

#[test]
fn unknown_user_always_fails_and_keeps_its_salt() {
    let server = ScramServer::for_unknown_user("nobody", b"mock key");
    assert_eq!(
        exchange(server, "", ChannelBinding::unsupported()),
        Err(ScramError::InvalidProof)
    );

    let first = |user: &str| {
        let server = ScramServer::for_unknown_user(user, b"mock key")
            .client_first(b"n,,n=,r=abc")
            .unwrap();
        let text = String::from_utf8(server.server_first_message().to_vec()).unwrap();
        // Drop the nonce, which is random on every attempt.
        text.split_once(",s=").unwrap().1.to_owned()
    };
    assert_eq!(first("nobody"), first("nobody"));
    assert_ne!(first("nobody"), first("somebody"));
    assert!(first("nobody").ends_with(",i=4096"));
}

#[test]
fn random_server_nonces_differ_and_are_base64() {
    let nonce = |server: ScramServer| {
        let server = server.client_first(b"n,,n=,r=abc").unwrap();
        let text = String::from_utf8(server.server_first_message().to_vec()).unwrap();
        let (nonce, _) = text.strip_prefix("r=abc").unwrap().split_once(',').unwrap();
        nonce.to_owned()
    };
    let a = nonce(ScramServer::new(fast_secret("pw")));
    let b = nonce(ScramServer::new(fast_secret("pw")));
    assert_ne!(a, b);
    assert_eq!(STANDARD.decode(&a).unwrap().len(), SERVER_NONCE_RAW_LEN);
}

#[test]
fn with_nonce_refuses_unprintable_nonces() {
    for nonce in ["", "a,b", "a b", "é", "a\0"] {
        assert_eq!(
            ScramServer::with_nonce(fast_secret("pw"), nonce).unwrap_err(),
            ScramError::InvalidServerNonce
        );
    }
}

#[test]
fn client_first_refusals() {
    let refuse = |message: &str| {
        ScramServer::new(fast_secret("pw"))
            .client_first(message.as_bytes())
            .unwrap_err()
    };
    assert_eq!(
        refuse("p=tls-server-end-point,,n=,r=abc"),
        ScramError::ChannelBindingUnsupported
    );
    assert_eq!(
        refuse("n,a=admin,n=,r=abc"),
        ScramError::Unsupported("authorization identity")
    );
    assert!(matches!(refuse(""), ScramError::Malformed(_)));
    assert!(matches!(refuse("garbage"), ScramError::Malformed(_)));
    assert!(matches!(refuse("n,,n=,x=abc"), ScramError::Malformed(_)));
}

#[test]
fn client_final_refusals() {
    let final_error = |message: &str| rfc_after_first().client_final(message.as_bytes()).unwrap_err();
    let nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    let proof = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";

    // A wrong nonce: someone else's, truncated, or extended.
    for wrong in [
        "rOprNGfwEbeRWgbNEkqO",
        "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k",
        "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0x",
        "xOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
    ] {
        assert_eq!(
            final_error(&format!("c=biws,r={wrong},p={proof}")),
            ScramError::NonceMismatch
        );
    }
    // Channel-binding data for a client that used "p=".
    assert_eq!(
        final_error(&format!("c=cD10bHMtdW5pcXVlLCxhYmM=,r={nonce},p={proof}")),
        ScramError::ChannelBindingMismatch
    );
    assert_eq!(
        final_error(&format!("c=,r={nonce},p={proof}")),
        ScramError::ChannelBindingMismatch
    );
    // The right message with one bit of the proof flipped.
    let mut bad_proof = STANDARD.decode(proof).unwrap();
    bad_proof[31] ^= 0x80;
    let bad_proof = STANDARD.encode(bad_proof);
    assert_eq!(
        final_error(&format!("c=biws,r={nonce},p={bad_proof}")),
        ScramError::InvalidProof
    );
    // An extension changes the AuthMessage, so the RFC's proof no longer fits.
    assert_eq!(
        final_error(&format!("c=biws,r={nonce},x=ext,p={proof}")),
        ScramError::InvalidProof
    );
    // Missing attributes, bad base64, garbage.
    for message in [
        String::new(),
        "garbage".to_owned(),
        format!("c=biws,r={nonce}"),
        format!("c=biws,p={proof}"),
        format!("r={nonce},p={proof}"),
        format!("c=biws,r={nonce},p=not*base64"),
        format!("c=biws,r={nonce},p={proof},"),
        format!("{RFC_CLIENT_FINAL}\0"),
    ] {
        assert!(
            matches!(final_error(&message), ScramError::Malformed(_)),
            "{message:?}"
        );
    }
}

#[test]
fn errors_map_to_postgres_sqlstates() {
    assert_eq!(ScramError::InvalidProof.sqlstate().as_str(), "28P01");
    assert_eq!(ScramError::InvalidSecret("x").sqlstate().as_str(), "28P01");
    assert_eq!(ScramError::NonceMismatch.sqlstate().as_str(), "08P01");
    assert_eq!(ScramError::Malformed("x").sqlstate().as_str(), "08P01");
    assert_eq!(ScramError::Unsupported("x").sqlstate().as_str(), "0A000");
    assert!(ScramError::InvalidProof.is_client_error());
    assert!(!ScramError::InvalidSecret("x").is_client_error());
    assert_eq!(ScramError::NonceMismatch.kind(), "nonce_mismatch");
}

/// Random bytes and random mutations of valid messages: every outcome is an
/// `Ok` or an `Err`, never a panic.
#[test]
fn random_input_never_panics() {
    let mut rng = StdRng::seed_from_u64(0x5ca1_ab1e);
    let alphabet = b"npyacmrs=,biwsEe0123456789+/%$)\0\xff\xc3";
    let secret = fast_secret("pw");
    let random_bytes = |rng: &mut StdRng| -> Vec<u8> {
        let len = rng.gen_range(0..80);
        (0..len)
            .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
            .collect()
    };
    let mutate = |rng: &mut StdRng, message: &str| -> Vec<u8> {
        let mut bytes = message.as_bytes().to_vec();
        for _ in 0..rng.gen_range(1..4) {
            let at = rng.gen_range(0..bytes.len());
            match rng.gen_range(0..3) {
                0 => bytes[at] = alphabet[rng.gen_range(0..alphabet.len())],
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.truncate(at),
            }
            if bytes.is_empty() {
                break;
            }
        }
        bytes
    };

    let server_nonce = "server-nonce";
    for _ in 0..3_000 {
        for message in [random_bytes(&mut rng), mutate(&mut rng, "n,,n=,r=abc,x=y")] {
            let _ = ScramServer::with_nonce(secret.clone(), server_nonce)
                .unwrap()
                .client_first(&message);
        }

        let proof = STANDARD.encode([1u8; 32]);
        let valid_final = format!("c=biws,r=abc{server_nonce},x=y,p={proof}");
        for message in [random_bytes(&mut rng), mutate(&mut rng, &valid_final)] {
            let server = ScramServer::with_nonce(secret.clone(), server_nonce)
                .unwrap()
                .client_first(b"n,,n=,r=abc")
                .unwrap();
            let _ = server.client_final(&message);
        }
    }
}

#[test]
fn channel_binding_with_postgres_protocol_client() {
    let secret = fast_secret("pw");
    let data = b"certificate hash".to_vec();
    // The client binds to the same channel: accepted.
    let server = ScramServer::new(secret.clone()).with_channel_binding(data.clone(), true);
    assert_eq!(
        exchange(server, "pw", ChannelBinding::tls_server_end_point(data.clone())),
        Ok(true)
    );
    // Bound to another channel (a man in the middle terminating TLS): refused.
    let server = ScramServer::new(secret.clone()).with_channel_binding(data.clone(), true);
    assert_eq!(
        exchange(
            server,
            "pw",
            ChannelBinding::tls_server_end_point(b"other".to_vec())
        ),
        Err(ScramError::ChannelBindingMismatch)
    );
    // TLS, plain SCRAM-SHA-256 chosen by a client without channel binding: fine.
    let server = ScramServer::new(secret.clone()).with_channel_binding(data.clone(), false);
    assert_eq!(exchange(server, "pw", ChannelBinding::unsupported()), Ok(true));
    // A client that supports it but thinks the server does not, on a server that offered it:
    // a downgrade.
    let server = ScramServer::new(secret.clone()).with_channel_binding(data.clone(), false);
    assert_eq!(
        exchange(server, "pw", ChannelBinding::unrequested()),
        Err(ScramError::ChannelBindingDowngrade)
    );
    // The mechanism and the flag must agree.
    let server = ScramServer::new(secret.clone()).with_channel_binding(data.clone(), true);
    assert!(matches!(
        exchange(server, "pw", ChannelBinding::unsupported()),
        Err(ScramError::Malformed(_))
    ));
    let server = ScramServer::new(secret.clone()).with_channel_binding(data.clone(), false);
    assert!(matches!(
        exchange(server, "pw", ChannelBinding::tls_server_end_point(data)),
        Err(ScramError::Malformed(_))
    ));
    // No TLS: a client that requires binding is turned away.
    let server = ScramServer::new(secret);
    assert_eq!(
        exchange(server, "pw", ChannelBinding::tls_server_end_point(b"x".to_vec())),
        Err(ScramError::ChannelBindingUnsupported)
    );
}

#[test]
fn tls_server_end_point_hashes_by_the_signature_algorithm() {
    // A minimal DER certificate shape: SEQUENCE { SEQUENCE {}, SEQUENCE { OID }, BIT STRING }.
    fn cert(oid: &[u8]) -> Vec<u8> {
        let mut alg = vec![0x06, oid.len() as u8];
        alg.extend_from_slice(oid);
        let mut body = vec![0x30, 0x00, 0x30, alg.len() as u8];
        body.extend_from_slice(&alg);
        body.extend_from_slice(&[0x03, 0x01, 0x00]);
        let mut der = vec![0x30, body.len() as u8];
        der.extend_from_slice(&body);
        der
    }
    let rsa = |n: u8| cert(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, n]);
    let ecdsa = |n: u8| cert(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, n]);
    let sha256 = |der: &[u8]| Sha256::digest(der).to_vec();
    for der in [
        rsa(11),
        rsa(5),
        rsa(4),
        ecdsa(2),
        cert(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01]),
    ] {
        assert_eq!(tls_server_end_point(&der), Some(sha256(&der)));
    }
    assert_eq!(tls_server_end_point(&rsa(12)).map(|h| h.len()), Some(48));
    assert_eq!(tls_server_end_point(&ecdsa(4)).map(|h| h.len()), Some(64));
    // Ed25519 (1.3.101.112) and RSASSA-PSS have no single hash; garbage is no certificate.
    assert_eq!(tls_server_end_point(&cert(&[0x2b, 0x65, 0x70])), None);
    assert_eq!(tls_server_end_point(&rsa(10)), None);
    assert_eq!(tls_server_end_point(b"\x30\x82\xff"), None);
    assert_eq!(tls_server_end_point(b""), None);
}
