//! Parsers for the two SCRAM messages a client sends.
//!
//! Grammar from RFC 5802 section 7; checks follow `read_client_first_message`
//! and `read_client_final_message` in PostgreSQL's
//! src/backend/libpq/auth-scram.c. Attribute values never contain ',', so a
//! message is split on commas and each part is one attribute.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::ScramError;

/// The parts of a client-first-message the server uses.
#[derive(Debug)]
pub(super) struct ClientFirst<'a> {
    /// The GS2 channel-binding flag.
    pub flag: Gs2Flag<'a>,
    /// client-first-message-bare: the message without its GS2 header, which
    /// starts the AuthMessage both sides sign.
    pub bare: &'a str,
    /// The client's nonce (`r=`).
    pub nonce: &'a str,
}

/// The parts of a client-final-message the server uses.
#[derive(Debug)]
pub(super) struct ClientFinal<'a> {
    /// Everything before `,p=`, which ends the AuthMessage.
    pub without_proof: &'a str,
    /// The base64 channel-binding attribute (`c=`), still encoded.
    pub channel_binding: &'a str,
    /// The combined client and server nonce (`r=`).
    pub nonce: &'a str,
    /// The decoded ClientProof (`p=`).
    pub proof: [u8; 32],
}

/// The channel-binding flag of the GS2 header (RFC 5802, section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gs2Flag<'a> {
    /// `n`: the client does not support channel binding.
    NotSupported,
    /// `y`: the client supports it but thinks the server does not.
    NotOffered,
    /// `p=<type>`: the client binds to the channel with this type.
    Binding(&'a str),
}

impl Gs2Flag<'_> {
    /// The GS2 header as it starts the client-first message (no authorization identity).
    pub(super) fn header(&self) -> String {
        match self {
            Gs2Flag::NotSupported => "n,,".to_owned(),
            Gs2Flag::NotOffered => "y,,".to_owned(),
            Gs2Flag::Binding(name) => format!("p={name},,"),
        }
    }
}

/// Parses `gs2-header client-first-message-bare`, e.g. `n,,n=,r=<nonce>`.
pub(super) fn client_first(message: &[u8]) -> Result<ClientFirst<'_>, ScramError> {
    let text = as_text(message)?;

    let (flag, rest) = text
        .split_once(',')
        .ok_or(ScramError::Malformed("missing GS2 header"))?;
    let flag = match flag {
        // The client does not support channel binding.
        "n" => Gs2Flag::NotSupported,
        // It does, but thinks the server does not.
        "y" => Gs2Flag::NotOffered,
        _ => match flag.strip_prefix("p=") {
            Some(name) if !name.is_empty() => Gs2Flag::Binding(name),
            _ => return Err(ScramError::Malformed("unexpected channel-binding flag")),
        },
    };
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or(ScramError::Malformed("missing GS2 header"))?;
    if authzid.starts_with("a=") {
        return Err(ScramError::Unsupported("authorization identity"));
    }
    if !authzid.is_empty() {
        return Err(ScramError::Malformed("unexpected attribute in GS2 header"));
    }

    let mut attributes = bare.split(',');
    let user = attributes.next().unwrap_or_default();
    if user.starts_with("m=") {
        return Err(ScramError::Unsupported("mandatory extension"));
    }
    // PostgreSQL takes the user name from the startup packet and ignores this
    // one; libpq sends it empty.
    attribute(user, "n=", "expected user name attribute")?;
    let nonce = attribute(
        attributes.next().unwrap_or_default(),
        "r=",
        "expected nonce attribute",
    )?;
    if !is_printable_nonce(nonce) {
        return Err(ScramError::Malformed("nonce is empty or not printable"));
    }
    for extension in attributes {
        check_extension(extension)?;
    }
    Ok(ClientFirst { flag, bare, nonce })
}

/// Parses `c=<cbind>,r=<nonce>[,extensions],p=<proof>`.
pub(super) fn client_final(message: &[u8]) -> Result<ClientFinal<'_>, ScramError> {
    let text = as_text(message)?;

    let (without_proof, proof) = text
        .rsplit_once(',')
        .ok_or(ScramError::Malformed("missing proof"))?;
    let proof = attribute(proof, "p=", "proof is not the last attribute")?;

    let mut attributes = without_proof.split(',');
    let channel_binding = attribute(
        attributes.next().unwrap_or_default(),
        "c=",
        "expected channel-binding attribute",
    )?;
    let nonce = attribute(
        attributes.next().unwrap_or_default(),
        "r=",
        "expected nonce attribute",
    )?;
    for extension in attributes {
        if extension.starts_with("p=") {
            return Err(ScramError::Malformed("proof is not the last attribute"));
        }
        check_extension(extension)?;
    }

    let proof = STANDARD
        .decode(proof)
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or(ScramError::Malformed("proof is not 32 bytes of base64"))?;
    Ok(ClientFinal {
        without_proof,
        channel_binding,
        nonce,
        proof,
    })
}

/// The OID (content bytes) of an X.509 certificate's `signatureAlgorithm`:
/// `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm
/// SEQUENCE { algorithm OBJECT IDENTIFIER, ... }, signature BIT STRING }`
/// (RFC 5280, 4.1), read from DER. `None` for anything else.
pub(super) fn signature_algorithm_oid(der: &[u8]) -> Option<&[u8]> {
    let (certificate, _) = der_element(der, 0x30)?;
    let (_tbs, rest) = der_element(certificate, 0x30)?;
    let (algorithm, _) = der_element(rest, 0x30)?;
    let (oid, _) = der_element(algorithm, 0x06)?;
    Some(oid)
}

/// One DER element with tag `tag` at the start of `input`: its contents and what follows it.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let octets = usize::from(first & 0x7f);
        if octets == 0 || octets > 4 || rest.len() < octets {
            return None;
        }
        let (bytes, after) = rest.split_at(octets);
        rest = after;
        bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b))
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

/// Whether `nonce` is a valid nonce: `printable` in RFC 5802, that is ASCII
/// 0x21..=0x7E except ',' (PostgreSQL's `is_scram_printable`), and not empty.
pub(super) fn is_printable_nonce(nonce: &str) -> bool {
    !nonce.is_empty() && nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// The message as text: SCRAM messages are UTF-8, and PostgreSQL rejects an
/// embedded NUL ("length mismatch").
fn as_text(message: &[u8]) -> Result<&str, ScramError> {
    if message.is_empty() {
        return Err(ScramError::Malformed("empty message"));
    }
    if message.contains(&0) {
        return Err(ScramError::Malformed("message contains a NUL byte"));
    }
    std::str::from_utf8(message).map_err(|_| ScramError::Malformed("message is not UTF-8"))
}

/// The value of `part` if it is the attribute `prefix` (e.g. `"r="`).
fn attribute<'a>(part: &'a str, prefix: &str, error: &'static str) -> Result<&'a str, ScramError> {
    part.strip_prefix(prefix).ok_or(ScramError::Malformed(error))
}

/// An extension the server does not know: `attr-val` with a letter for a name.
/// PostgreSQL skips these (`read_any_attr`); so do we.
fn check_extension(part: &str) -> Result<(), ScramError> {
    match part.as_bytes() {
        [name, b'=', ..] if name.is_ascii_alphabetic() => Ok(()),
        _ => Err(ScramError::Malformed("malformed attribute")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_first_takes_libpq_and_rfc_forms() {
        let parsed = client_first(b"n,,n=,r=abc").unwrap();
        assert_eq!(parsed.bare, "n=,r=abc");
        assert_eq!(parsed.nonce, "abc");

        let parsed = client_first(b"y,,n=user,r=rOprNGfwEbeRWgbNEkqO,x=ext").unwrap();
        assert_eq!(parsed.bare, "n=user,r=rOprNGfwEbeRWgbNEkqO,x=ext");
        assert_eq!(parsed.nonce, "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(parsed.flag, Gs2Flag::NotOffered);

        let parsed = client_first(b"p=tls-server-end-point,,n=,r=abc").unwrap();
        assert_eq!(parsed.flag, Gs2Flag::Binding("tls-server-end-point"));
        assert_eq!(parsed.flag.header(), "p=tls-server-end-point,,");
    }

    #[test]
    fn client_first_errors() {
        let cases: &[(&[u8], ScramError)] = &[
            (
                b"p=,,n=,r=abc",
                ScramError::Malformed("unexpected channel-binding flag"),
            ),
            (
                b"n,a=admin,n=,r=abc",
                ScramError::Unsupported("authorization identity"),
            ),
            (
                b"n,,m=ext,n=,r=abc",
                ScramError::Unsupported("mandatory extension"),
            ),
            (b"", ScramError::Malformed("empty message")),
            (
                b"n,,n=,r=a\0bc",
                ScramError::Malformed("message contains a NUL byte"),
            ),
            (b"n,,n=,r=\xff", ScramError::Malformed("message is not UTF-8")),
            (b"n", ScramError::Malformed("missing GS2 header")),
            (b"n,", ScramError::Malformed("missing GS2 header")),
            (
                b"x,,n=,r=abc",
                ScramError::Malformed("unexpected channel-binding flag"),
            ),
            (
                b"n,x,n=,r=abc",
                ScramError::Malformed("unexpected attribute in GS2 header"),
            ),
            (b"n,,", ScramError::Malformed("expected user name attribute")),
            (b"n,,r=abc", ScramError::Malformed("expected user name attribute")),
            (b"n,,n=", ScramError::Malformed("expected nonce attribute")),
            (b"n,,n=,x=abc", ScramError::Malformed("expected nonce attribute")),
            (
                b"n,,n=,r=",
                ScramError::Malformed("nonce is empty or not printable"),
            ),
            (
                b"n,,n=,r=a b",
                ScramError::Malformed("nonce is empty or not printable"),
            ),
            (b"n,,n=,r=abc,", ScramError::Malformed("malformed attribute")),
            (b"n,,n=,r=abc,1=x", ScramError::Malformed("malformed attribute")),
            (b"n,,n=,r=abc,xx", ScramError::Malformed("malformed attribute")),
        ];
        for (message, expected) in cases {
            assert_eq!(
                client_first(message).unwrap_err(),
                *expected,
                "{:?}",
                String::from_utf8_lossy(message)
            );
        }
    }

    #[test]
    fn client_final_splits_off_the_proof() {
        let proof = STANDARD.encode([7u8; 32]);
        let message = format!("c=biws,r=abcdef,x=ext,p={proof}");
        let parsed = client_final(message.as_bytes()).unwrap();
        assert_eq!(parsed.without_proof, "c=biws,r=abcdef,x=ext");
        assert_eq!(parsed.channel_binding, "biws");
        assert_eq!(parsed.nonce, "abcdef");
        assert_eq!(parsed.proof, [7u8; 32]);
    }

    #[test]
    fn client_final_errors() {
        let proof = STANDARD.encode([7u8; 32]);
        let short = STANDARD.encode([7u8; 31]);
        let cases = [
            (String::new(), "empty message"),
            ("c=biws".to_owned(), "missing proof"),
            ("c=biws,r=abc".to_owned(), "proof is not the last attribute"),
            (
                format!("c=biws,r=abc,p={proof},x=y"),
                "proof is not the last attribute",
            ),
            (
                format!("c=biws,r=abc,p={proof},p={proof}"),
                "proof is not the last attribute",
            ),
            (
                format!("r=abc,c=biws,p={proof}"),
                "expected channel-binding attribute",
            ),
            (format!("c=biws,p={proof}"), "expected nonce attribute"),
            (format!("c=biws,r=abc,,p={proof}"), "malformed attribute"),
            ("c=biws,r=abc,p=".to_owned(), "proof is not 32 bytes of base64"),
            (
                "c=biws,r=abc,p=!!!!".to_owned(),
                "proof is not 32 bytes of base64",
            ),
            (
                format!("c=biws,r=abc,p={short}"),
                "proof is not 32 bytes of base64",
            ),
        ];
        for (message, reason) in cases {
            assert_eq!(
                client_final(message.as_bytes()).unwrap_err(),
                ScramError::Malformed(reason),
                "{message:?}"
            );
        }
    }
}
