//! Shopper accounts: what a username and a password may be.

use super::ValidationError;

pub const USERNAME_LEN: std::ops::RangeInclusive<usize> = 3..=64;
pub const PASSWORD_LEN: std::ops::RangeInclusive<usize> = 8..=128;

/// Usernames are 3..=64 characters of ASCII letters, digits, `_`, `-` and `.`:
/// a set that is safe in URLs, logs and terminals and has no look-alikes.
pub fn validate_username(username: &str) -> Result<(), ValidationError> {
    if !USERNAME_LEN.contains(&username.len()) {
        return Err(ValidationError::new(
            "username",
            "must be 3 to 64 characters long",
        ));
    }
    if !username
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(ValidationError::new(
            "username",
            "may hold only ASCII letters, digits, '_', '-' and '.'",
        ));
    }
    Ok(())
}

/// Passwords are 8..=128 characters (counted as Unicode scalar values).
pub fn validate_password(password: &str) -> Result<(), ValidationError> {
    if !PASSWORD_LEN.contains(&password.chars().count()) {
        return Err(ValidationError::new(
            "password",
            "must be 8 to 128 characters long",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert!(validate_username("alice").is_ok());
        assert!(validate_username("a.b-c_9").is_ok());
        assert!(validate_username("ab").is_err());
        assert!(validate_username(&"x".repeat(65)).is_err());
        assert!(validate_username(&"x".repeat(64)).is_ok());
        assert!(validate_username("bob smith").is_err());
        assert!(validate_username("bøb").is_err());
        assert!(validate_username("a/b").is_err());
    }

    #[test]
    fn passwords() {
        assert!(validate_password("12345678").is_ok());
        assert!(validate_password("1234567").is_err());
        assert!(validate_password(&"p".repeat(128)).is_ok());
        assert!(validate_password(&"p".repeat(129)).is_err());
        // Counted in characters, not bytes.
        assert!(validate_password("ééééééé").is_err());
        assert!(validate_password("éééééééé").is_ok());
    }
}
