//! Chat templates: the Jinja template a GGUF file carries (`tokenizer.chat_template`),
//! rendered with `minijinja` as Hugging Face's `apply_chat_template` does.
//!
//! A template comes from a model file, so it runs under fuel (a bound on its instructions)
//! and its output under a size cap. Message text is data: control tokens inside it are not
//! parsed as such when the prompt is tokenized (see [`ChatTemplate::render`]).

use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::{Deserialize, Serialize};

use super::LlmError;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (or a role the template knows).
    pub role: String,
    /// The text.
    pub content: String,
}

/// Instructions a template may execute per render (a ChatML render of a long chat takes a
/// few thousand).
const FUEL: u64 = 2_000_000;
/// Most bytes a rendered prompt may have.
const MAX_PROMPT_BYTES: usize = 4 << 20;

/// How `raise_exception` messages start: the template refused the messages (the caller's
/// fault), unlike any other render error (the template's).
const REFUSED: &str = "the chat template refused the messages: ";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Compiles `source`; `bos`/`eos` are the texts of the model's begin/end tokens, which
    /// templates may reference as `bos_token` / `eos_token`.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate, LlmError> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(64);
        // Python string methods (`.strip()`, `.startswith()`) that Hugging Face templates use.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, format!("{REFUSED}{msg}")))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| LlmError::Template(format!("the model's chat template does not compile: {e}")))?;
        Ok(ChatTemplate { env, bos: bos.to_string(), eos: eos.to_string() })
    }

    /// Renders `messages`, ending with the assistant's opening when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, LlmError> {
        if messages.is_empty() {
            return Err(LlmError::BadParameter("messages must not be empty".into()));
        }
        let tmpl = self.env.get_template("chat").map_err(|e| LlmError::Template(e.to_string()))?;
        let text = tmpl
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(|e| match e.detail() {
                Some(d) if d.starts_with(REFUSED) => LlmError::BadParameter(d.to_string()),
                _ => LlmError::Template(format!("rendering the chat template: {e}")),
            })?;
        if text.len() > MAX_PROMPT_BYTES {
            return Err(LlmError::BadParameter(format!("the rendered prompt is over {MAX_PROMPT_BYTES} bytes")));
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    #[test]
    fn renders_chatml_with_the_default_system_prompt() {
        let t = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").unwrap();
        assert_eq!(
            t.render(&[msg("user", "Hi")], true).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&[msg("system", "S"), msg("user", "U")], false).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        );
        assert!(matches!(t.render(&[], true), Err(LlmError::BadParameter(_))));
    }

    #[test]
    fn hostile_templates_end_in_errors() {
        // Runs forever without fuel.
        let spin = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(spin, "", "").unwrap();
        assert!(matches!(t.render(&[msg("user", "x")], true), Err(LlmError::Template(_))));
        assert!(matches!(ChatTemplate::new("{% for %}", "", ""), Err(LlmError::Template(_))));
        let raising = "{{ raise_exception('roles must alternate') }}";
        let t = ChatTemplate::new(raising, "", "").unwrap();
        assert!(t.render(&[msg("user", "x")], true).unwrap_err().to_string().contains("alternate"));
        // Python methods work.
        let t = ChatTemplate::new("{{ messages[0]['content'].strip() }}", "", "").unwrap();
        assert_eq!(t.render(&[msg("user", "  x  ")], true).unwrap(), "x");
    }
}
