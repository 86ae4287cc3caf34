use auth::bearer;

#[test]
fn bearer_takes_the_token_case_insensitively() {
    assert_eq!(bearer("Bearer abc.def.ghi"), Some("abc.def.ghi"));
    assert_eq!(bearer("bearer abc"), Some("abc"));
    assert_eq!(bearer("BEARER abc"), Some("abc"));
    assert_eq!(bearer("  Bearer   abc  "), Some("abc"));
}

#[test]
fn bearer_rejects_empty_tokens_and_other_schemes() {
    assert_eq!(bearer(""), None);
    assert_eq!(bearer("Bearer"), None);
    assert_eq!(bearer("Bearer "), None);
    assert_eq!(bearer("Bearer    "), None);
    assert_eq!(bearer("Basic dXNlcjpwYXNz"), None);
    assert_eq!(bearer("Bearerabc"), None);
    assert_eq!(bearer("Token abc"), None);
    assert_eq!(bearer("Bearer abc def"), None);
}
