//! ISO 4217 minor-unit exponents: how many decimal places a currency's smallest unit has.
//! A currency not listed is refused rather than guessed.

const ZERO: &[&str] = &[
    "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND", "VUV", "XAF",
    "XOF", "XPF",
];
const THREE: &[&str] = &["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];
const FOUR: &[&str] = &["CLF", "UYW"];
const TWO: &[&str] = &[
    "AED", "ARS", "AUD", "BDT", "BGN", "BRL", "CAD", "CHF", "CNY", "COP", "CZK", "DKK", "EGP", "EUR", "GBP",
    "HKD", "HUF", "IDR", "ILS", "INR", "KES", "KZT", "MAD", "MXN", "MYR", "NGN", "NOK", "NZD", "PEN", "PHP",
    "PKR", "PLN", "QAR", "RON", "RSD", "RUB", "SAR", "SEK", "SGD", "THB", "TRY", "TWD", "UAH", "USD", "UYU",
    "VES", "ZAR",
];

/// The minor-unit exponent of an ISO 4217 code (`USD` → 2, `JPY` → 0, `KWD` → 3).
pub fn minor_unit_exponent(code: &str) -> Option<u32> {
    [(ZERO, 0), (TWO, 2), (THREE, 3), (FOUR, 4)]
        .iter()
        .find(|(codes, _)| codes.contains(&code))
        .map(|(_, exponent)| *exponent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_codes() {
        assert_eq!(minor_unit_exponent("USD"), Some(2));
        assert_eq!(minor_unit_exponent("CNY"), Some(2));
        assert_eq!(minor_unit_exponent("JPY"), Some(0));
        assert_eq!(minor_unit_exponent("KWD"), Some(3));
        assert_eq!(minor_unit_exponent("usd"), None, "codes are upper case");
        assert_eq!(minor_unit_exponent("XYZ"), None);
    }
}
