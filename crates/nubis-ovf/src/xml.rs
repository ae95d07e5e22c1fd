//! A small namespace-resolved element tree built with quick-xml.
//!
//! OVF descriptors are small (kilobytes), and mapping them needs look-ups across the whole
//! document (disks refer to files, items to disks and networks), so the document is read once
//! into a tree whose element and attribute names are resolved to (namespace URI, local name).
//! Prefixes are gone after this step: `ovf:Disk` and a default-namespace `Disk` are the same.

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

/// Largest descriptor accepted, in bytes.
pub const MAX_DOCUMENT_LEN: usize = 4 << 20;

/// Deepest element nesting accepted.
pub const MAX_DEPTH: usize = 64;

/// Why a document could not be read into a tree.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    /// The XML itself is malformed.
    #[error("malformed XML near byte {position}")]
    Syntax {
        /// Byte offset where the reader stopped.
        position: u64,
        /// The cause.
        #[source]
        source: quick_xml::Error,
    },
    /// An element or attribute uses a namespace prefix that is not declared.
    #[error("undeclared namespace prefix {prefix:?} near byte {position}")]
    UnknownPrefix {
        /// The prefix.
        prefix: String,
        /// Byte offset.
        position: u64,
    },
    /// The document is larger than [`MAX_DOCUMENT_LEN`].
    #[error("document is {len} bytes; at most {MAX_DOCUMENT_LEN} are accepted")]
    TooLarge {
        /// The document's length.
        len: usize,
    },
    /// Elements are nested deeper than [`MAX_DEPTH`].
    #[error("elements are nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// The document has no root element, or text after it.
    #[error("document has no root element")]
    NoRoot,
}

/// One attribute, its name resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    /// Namespace URI; `None` for an unprefixed attribute.
    pub ns: Option<String>,
    /// Local name.
    pub local: String,
    /// Unescaped value.
    pub value: String,
}

/// One element, its name resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// Namespace URI; `None` when the element is in no namespace.
    pub ns: Option<String>,
    /// Local name.
    pub local: String,
    /// The name as written, e.g. `ovf:Disk`, for error messages.
    pub qname: String,
    /// Attributes other than namespace declarations.
    pub attrs: Vec<Attr>,
    /// Child elements in document order.
    pub children: Vec<Element>,
    /// Concatenated text directly inside the element.
    pub text: String,
}

impl Element {
    /// Whether the element is `local` in namespace `ns`.
    pub fn is(&self, ns: &str, local: &str) -> bool {
        self.local == local && self.ns.as_deref() == Some(ns)
    }

    /// The value of the attribute `local` in namespace `ns`.
    pub fn attr_ns(&self, ns: &str, local: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|a| a.local == local && a.ns.as_deref() == Some(ns))
            .map(|a| a.value.as_str())
    }

    /// The value of the unprefixed attribute `local`.
    pub fn attr_plain(&self, local: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|a| a.local == local && a.ns.is_none())
            .map(|a| a.value.as_str())
    }

    /// Child elements named `local` in namespace `ns`.
    pub fn children_named<'a>(
        &'a self,
        ns: &'a str,
        local: &'a str,
    ) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.is(ns, local))
    }
}

fn qname_string(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn resolved(res: ResolveResult<'_>, position: u64) -> Result<Option<String>, XmlError> {
    match res {
        ResolveResult::Bound(ns) => Ok(Some(String::from_utf8_lossy(ns.as_ref()).into_owned())),
        ResolveResult::Unbound => Ok(None),
        ResolveResult::Unknown(prefix) => Err(XmlError::UnknownPrefix {
            prefix: String::from_utf8_lossy(&prefix).into_owned(),
            position,
        }),
    }
}

fn syntax(reader: &NsReader<&[u8]>, source: quick_xml::Error) -> XmlError {
    XmlError::Syntax {
        position: reader.buffer_position(),
        source,
    }
}

fn element(reader: &NsReader<&[u8]>, start: &BytesStart<'_>) -> Result<Element, XmlError> {
    let position = reader.buffer_position();
    let (ns, _) = reader.resolve_element(start.name());
    let ns = resolved(ns, position)?;
    let mut attrs = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(|e| syntax(reader, e.into()))?;
        let key = attr.key.as_ref();
        if key == b"xmlns" || key.starts_with(b"xmlns:") {
            continue;
        }
        let (ans, local) = reader.resolve_attribute(attr.key);
        let value = attr
            .unescape_value()
            .map_err(|e| syntax(reader, e))?
            .into_owned();
        attrs.push(Attr {
            ns: resolved(ans, position)?,
            local: String::from_utf8_lossy(local.as_ref()).into_owned(),
            value,
        });
    }
    Ok(Element {
        ns,
        local: String::from_utf8_lossy(start.local_name().as_ref()).into_owned(),
        qname: qname_string(start.name().as_ref()),
        attrs,
        children: Vec::new(),
        text: String::new(),
    })
}

/// Reads `text` into a tree and returns its root element.
///
/// No DTD is processed and no entity but the five predefined ones is expanded, so a document
/// cannot make the reader fetch anything or grow without bound.
pub fn parse(text: &str) -> Result<Element, XmlError> {
    if text.len() > MAX_DOCUMENT_LEN {
        return Err(XmlError::TooLarge { len: text.len() });
    }
    let mut reader = NsReader::from_str(text);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let event = reader.read_event().map_err(|e| syntax(&reader, e))?;
        match event {
            Event::Start(start) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep);
                }
                if root.is_some() {
                    return Err(XmlError::NoRoot);
                }
                let el = element(&reader, &start)?;
                stack.push(el);
            }
            Event::Empty(start) => {
                if root.is_some() {
                    return Err(XmlError::NoRoot);
                }
                let el = element(&reader, &start)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::End(_) => {
                let Some(done) = stack.pop() else {
                    return Err(XmlError::NoRoot);
                };
                match stack.last_mut() {
                    Some(parent) => parent.children.push(done),
                    None => root = Some(done),
                }
            }
            Event::Text(t) => {
                let s = t.unescape().map_err(|e| syntax(&reader, e))?;
                match stack.last_mut() {
                    Some(el) => el.text.push_str(&s),
                    None if s.trim().is_empty() => {}
                    None => return Err(XmlError::NoRoot),
                }
            }
            Event::CData(c) => {
                let s = c.decode().map_err(|e| syntax(&reader, e.into()))?;
                if let Some(el) = stack.last_mut() {
                    el.text.push_str(&s);
                }
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if !stack.is_empty() {
        return Err(XmlError::NoRoot);
    }
    root.ok_or(XmlError::NoRoot)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn prefixes_and_default_namespaces_resolve_alike() {
        let a = parse(r#"<o:E xmlns:o="urn:x" o:id="1"><o:C>t</o:C></o:E>"#).unwrap();
        let b = parse(r#"<E xmlns="urn:x" xmlns:o="urn:x" o:id="1"><C>t</C></E>"#).unwrap();
        for r in [&a, &b] {
            assert!(r.is("urn:x", "E"));
            assert_eq!(r.attr_ns("urn:x", "id"), Some("1"));
            assert_eq!(r.children_named("urn:x", "C").count(), 1);
            assert_eq!(r.children[0].text, "t");
        }
    }

    #[test]
    fn broken_documents_are_refused() {
        assert!(matches!(parse("<a><b></a>"), Err(XmlError::Syntax { .. })));
        assert!(matches!(parse(""), Err(XmlError::NoRoot)));
        assert!(matches!(parse("<a/><b/>"), Err(XmlError::NoRoot)));
        assert!(matches!(
            parse("<x:a/>"),
            Err(XmlError::UnknownPrefix { .. })
        ));
        let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
        assert!(matches!(parse(&deep), Err(XmlError::TooDeep)));
    }
}
